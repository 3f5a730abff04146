"""What the entry scripts share: build the config, join the process group, run,
turn user errors into one clear line and a non-zero status, always leave the
process group cleanly."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

from .config import load_config
from .distributed import init_distributed, shutdown
from .errors import UserError

EXIT_USER_ERROR = 2


def report_error(exc: BaseException, rank: int) -> None:
    # Every rank usually hits the same bad input; one message is enough.
    if rank == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)


def run_training(config_path: Optional[str], overrides: List[str]) -> int:
    from .trainer import EXIT_RESUMABLE, Preempted, run

    ctx = None
    try:
        cfg = load_config(config_path, overrides)
        ctx = init_distributed(cfg.device)
        result = run(cfg, ctx)
        if ctx.is_main:
            print("final: " + json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}), flush=True)
        return 0
    except Preempted:
        return EXIT_RESUMABLE
    except UserError as exc:
        report_error(exc, ctx.rank if ctx else 0)
        return EXIT_USER_ERROR
    finally:
        if ctx is not None:
            shutdown(ctx)


def run_evaluation(checkpoint_path: str, overrides: List[str], as_json: bool, tta_flip: bool) -> int:
    from .evaluation import evaluate_checkpoint, format_report

    ctx = None
    try:
        from .config import config_from_dict
        from .checkpoint import load_file

        payload = load_file(checkpoint_path)
        cfg = config_from_dict(payload["config"], overrides)
        ctx = init_distributed(cfg.device)
        report = evaluate_checkpoint(payload, cfg, ctx, tta_flip=tta_flip)
        if ctx.is_main:
            report["checkpoint"] = str(checkpoint_path)
            print(json.dumps(report, indent=2) if as_json else format_report(report), flush=True)
        return 0
    except UserError as exc:
        report_error(exc, ctx.rank if ctx else 0)
        return EXIT_USER_ERROR
    finally:
        if ctx is not None:
            shutdown(ctx)
