"""What the entry scripts share: build the config, join the process group, run,
turn user errors into one clear line and a non-zero status, always leave the
process group cleanly."""

from __future__ import annotations

import json
import sys
from typing import Callable, List, Optional, Tuple

from .config import Config, config_from_dict, load_config
from .distributed import DistContext, init_distributed, shutdown
from .errors import UserError

EXIT_USER_ERROR = 2
# EX_TEMPFAIL, "try again later": stopped by a signal or train.stop_after_steps after
# writing a checkpoint; a scheduler can requeue the job with --resume.
EXIT_RESUMABLE = 75


def _launch(prepare: Callable[[], Tuple[Config, object]], work: Callable[[Config, object, DistContext], None]) -> int:
    """prepare() -> (config, anything it loaded); then join the job and work(). Every
    rank hits the same bad input, so only rank 0 prints the message."""
    from .trainer import Preempted

    ctx: Optional[DistContext] = None
    try:
        cfg, loaded = prepare()
        ctx = init_distributed(cfg.device)
        work(cfg, loaded, ctx)
        return 0
    except Preempted:
        return EXIT_RESUMABLE
    except UserError as exc:
        if ctx is None or ctx.is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        if ctx is not None:
            shutdown(ctx)


def run_training(config_path: Optional[str], overrides: List[str]) -> int:
    from .trainer import run

    def work(cfg: Config, _: object, ctx: DistContext) -> None:
        result = run(cfg, ctx)
        if ctx.is_main:
            print("final: " + json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}), flush=True)

    return _launch(lambda: (load_config(config_path, overrides), None), work)


def run_evaluation(checkpoint_path: str, overrides: List[str], as_json: bool, tta_flip: bool) -> int:
    from .checkpoint import load_file
    from .evaluation import evaluate_checkpoint, format_report

    def prepare() -> Tuple[Config, object]:
        payload = load_file(checkpoint_path)
        return config_from_dict(payload["config"], overrides), payload

    def work(cfg: Config, payload: object, ctx: DistContext) -> None:
        report = evaluate_checkpoint(payload, cfg, ctx, tta_flip=tta_flip)  # type: ignore[arg-type]
        if ctx.is_main:
            report["checkpoint"] = str(checkpoint_path)
            print(json.dumps(report, indent=2) if as_json else format_report(report), flush=True)

    return _launch(prepare, work)
