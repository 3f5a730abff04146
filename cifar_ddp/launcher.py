"""What the entry scripts share: build the config, join the process group, run,
turn user errors into one clear line and a non-zero status. A run that ends or is
preempted leaves the process group together; a rank that fails leaves at once, so
that no other rank waits for it in a collective."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch.distributed as dist

from .config import Config, config_from_dict, load_config
from .distributed import DistContext, init_distributed, shutdown
from .errors import (EXIT_RESUMABLE, EXIT_USER_ERROR, Preempted, UserError, one_line_warnings, reader_left,
                     report_user_error)

PEER_FAILURE_GRACE_S = 3.0
_FILESYSTEM_FULL_OR_CLOSED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _launch(prepare: Callable[[], Tuple[Config, object]], work: Callable[[Config, object, DistContext], None],
            again: str = "continue with --resume") -> int:
    """prepare() -> (config, anything it loaded); then join the job and work(). `again`:
    what to do once a full disk has room again."""
    ctx: Optional[DistContext] = None
    code = 0
    one_line_warnings()
    try:
        cfg, loaded = prepare()
        ctx = init_distributed(cfg.device)
        if ctx.is_distributed and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # torchrun stops the other ranks with SIGTERM as soon as one exits with an error;
            # a rank still setting up (the trainer takes signals over once it trains) would
            # die without a word: it says why instead.
            signal.signal(signal.SIGTERM, _stopped_by_signal)
        work(cfg, loaded, ctx)
    except _StoppedBySignal:
        print(f"error: {_who(ctx)}stopped because another process of the job stopped, or the job was cancelled "
              "(SIGTERM before training began)", file=sys.stderr, flush=True)
        code = 1
    except Preempted:
        code = EXIT_RESUMABLE      # every rank stops at the same step: they leave together
        # The checkpoint is written. torchrun stops the other ranks (SIGTERM) as soon as the
        # first one exits non-zero, and they may still be leaving the group or finalizing
        # the interpreter (which resets Python-level handlers, so a handler would not do):
        # ignore it, and finish leaving with status 75 a moment later.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except UserError as exc:
        # Every failing rank says why (under a launcher, prefixed with its rank): an error
        # may be one rank's alone, e.g. a file only rank 0 writes.
        code = report_user_error(exc, _who(ctx))
    except BrokenPipeError:
        code = reader_left()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the other ranks must not wait for us
        if isinstance(exc, OSError) and exc.errno in _FILESYSTEM_FULL_OR_CLOSED:
            # A log or event file that cannot be written any more (checkpoints say so themselves).
            print(f"error: {_who(ctx)}cannot write '{exc.filename or 'a file'}' ({exc.strerror}); free space "
                  f"there or pick another folder, then {again}", file=sys.stderr, flush=True)
            code = EXIT_USER_ERROR
        elif ctx is None or not ctx.is_distributed:
            raise
        elif _peer_failed(exc):
            # A peer died or left: its own message says why; this one only follows it. It
            # waits a moment first, so that the launcher (torchrun polls every 0.1 s) sees the
            # peer's failure as the root cause and stops this process itself.
            print(f"error: {_who(ctx)}stopped because another process of the job stopped "
                  f"({type(exc).__name__})", file=sys.stderr, flush=True)
            time.sleep(PEER_FAILURE_GRACE_S)
            code = 1
        else:
            traceback.print_exc()
            code = 1
    if signal.getsignal(signal.SIGTERM) is _stopped_by_signal:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # leaving: the default again
    if code in (0, EXIT_RESUMABLE) or ctx is None or not ctx.is_distributed:
        if ctx is not None:
            shutdown(ctx)
        return code
    # A failure on some ranks only: the others may be blocked in a collective waiting for
    # this one, and a barrier or an orderly teardown would wait for them until the
    # process-group timeout. Leave at once instead: the peers' collectives then fail on
    # the closed connection (or torchrun stops them), and the job ends within seconds.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _StoppedBySignal(Exception):
    """SIGTERM reached a rank of a multi-process job before the trainer took signals over."""


def _stopped_by_signal(signum: int, frame: object) -> None:
    raise _StoppedBySignal()


def _peer_failed(exc: Exception) -> bool:
    # gloo reports a dead peer as a plain RuntimeError naming the lost connection.
    lost = ("Connection closed by peer", "Connection reset by peer")
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(s in str(exc) for s in lost))


def _who(ctx: Optional[DistContext]) -> str:
    return f"rank {ctx.rank}: " if ctx is not None and ctx.world_size > 1 else ""


def run_training(config_path: Optional[str], overrides: List[str]) -> int:
    from .timing import PhaseClock
    from .trainer import run

    def work(cfg: Config, _: object, ctx: DistContext) -> None:
        result = run(cfg, ctx, clock=PhaseClock(since_process_start=True))
        if ctx.is_main:
            print("final: " + json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}), flush=True)

    return _launch(lambda: (load_config(config_path, overrides), None), work)


def train_here(cfg: Config) -> dict:
    """One training run in this process, for the notebook API (cifar_ddp.api.train): the
    process group joined and left around it, errors raised as they are."""
    from .trainer import run

    ctx = init_distributed(cfg.device)
    try:
        return run(cfg, ctx)
    finally:
        shutdown(ctx)


def run_evaluation(checkpoint_path: str, overrides: List[str], as_json: bool, tta_flip: bool,
                   report_dir: Optional[str] = None, gallery: int = 25, cam_layer: str = "",
                   trust_model_code: bool = False) -> int:
    from .checkpoint import load_file
    from .evaluation import evaluate_checkpoint, format_report
    from .files import check_writable_folder
    from .lock import refuse_if_held
    from .models import require_named

    def prepare() -> Tuple[Config, object]:
        if gallery < 0:
            raise UserError(f"--gallery is {gallery}; it is how many mistakes the report shows, 0 or more")
        if report_dir:   # before the checkpoint is read: a refusal should not wait for it
            check_writable_folder(Path(report_dir), "--report")
            refuse_if_held(Path(report_dir), "--report")
        payload = load_file(checkpoint_path)
        cfg = config_from_dict(payload["config"], overrides)
        require_named(cfg.model.name, overrides, trust_model_code, f"checkpoint '{checkpoint_path}'")
        return cfg, payload

    def work(cfg: Config, payload: object, ctx: DistContext) -> None:
        figures = evaluate_checkpoint(payload, cfg, ctx, tta_flip=tta_flip,  # type: ignore[arg-type]
                                      source=checkpoint_path, report_dir=Path(report_dir) if report_dir else None,
                                      gallery=gallery, cam_layer=cam_layer)
        if ctx.is_main:
            figures["checkpoint"] = str(checkpoint_path)
            print(json.dumps(figures, indent=2) if as_json else format_report(figures), flush=True)
            if report_dir and not as_json:
                print(f"report: {Path(report_dir) / 'report.md'} and {Path(report_dir) / 'index.html'}", flush=True)

    return _launch(prepare, work, again="run the evaluation again")


def run_lr_find(config_path: Optional[str], overrides: List[str], steps: int, start: float, end: float,
                out: Optional[str]) -> int:
    from .files import check_writable_folder
    from .lock import refuse_if_held
    from .lr_find import lr_range_test, plot
    from .report import save

    def prepare() -> Tuple[Config, object]:
        if not (0 < start < end) or steps < 10:
            raise UserError(f"the sweep needs 0 < --start < --end and --steps >= 10 (got --start {start:g}, "
                            f"--end {end:g}, --steps {steps})")
        return load_config(config_path, overrides), None

    def work(cfg: Config, _: object, ctx: DistContext) -> None:
        path = _plot_path(Path(out) if out else Path(cfg.out_dir) / "lr_find.png")
        check_writable_folder(path.parent, "--out folder")
        refuse_if_held(path.parent, "--out folder")
        result = lr_range_test(cfg, ctx, steps=steps, start=start, end=end)
        if ctx.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            save(plot(result), path)
            print(f"swept {len(result.lrs)} steps, LR {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}"
                  + (" (stopped early: the loss diverged)" if result.stopped_early else "") + f"; plot: {path}")
            print(f"suggested peak LR {result.suggested_lr:.4g} at global batch {result.global_batch}: "
                  f"train.lr={result.suggested_train_lr:.4g} (train.lr is per {result.lr_reference_batch} images)",
                  flush=True)

    return _launch(prepare, work, again="run lr_find again")


def _plot_path(path: Path) -> Path:
    """The file the plot really goes to: into a folder, lr_find.png; without a suffix, .png
    (as matplotlib would add); a suffix matplotlib cannot draw is refused."""
    from matplotlib.backend_bases import FigureCanvasBase

    if path.is_dir():
        return path / "lr_find.png"
    if not path.suffix:
        return path.with_name(path.name + ".png")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in kinds:
        raise UserError(f"--out '{path}' ends in {path.suffix}, which is not a picture format matplotlib writes; "
                        f"use one of {', '.join('.' + k for k in sorted(kinds))}, e.g. {path.with_suffix('.png')}")
    return path


