"""Score a saved checkpoint on the test split of the configured data."""

from __future__ import annotations

from typing import Any, Dict

from . import checkpoint as ckpt
from .config import Config
from .data.loaders import eval_shard
from .data.sources import ChannelStats, load_dataset
from .distributed import DistContext
from .engine import evaluate, resolve_precision
from .inference import checkpoint_weights
from .trainer import build_training_model, class_names


def evaluate_checkpoint(payload: Dict[str, Any], cfg: Config, ctx: DistContext,
                        tta_flip: bool = False, source: str = "checkpoint") -> Dict[str, Any]:
    # Normalization uses the training statistics stored with the checkpoint, so a
    # folder holding only test/ is enough.
    stats = ChannelStats(**{k: tuple(v) for k, v in payload["stats"].items()})
    data = load_dataset(cfg.data, seed=cfg.seed, with_train=False, stats=stats, classes=class_names(cfg))
    model = build_training_model(cfg, ctx)
    ckpt.check_architecture(payload, model.state_dict(), source,
                            advice="(drop the model.* overrides), or pass a checkpoint of this architecture")
    state, uses_ema = checkpoint_weights(payload)   # the weights the run itself evaluated
    model.load_state_dict(state)
    precision = resolve_precision(cfg.train.precision, ctx.device)
    shard = eval_shard(data.test, ctx.rank, ctx.world_size)
    result = evaluate(model, shard, stats, ctx, precision, cfg.model.num_classes,
                      tta_flip=tta_flip, channels_last=cfg.train.channels_last)
    return {
        "images": result.total,
        "accuracy": result.accuracy,
        "loss": result.loss,
        "correct": result.correct,
        "per_class_accuracy": dict(zip(data.classes, result.per_class_accuracy)),
        "weights": "ema" if uses_ema else "model",
        "tta_flip": tta_flip,
        "epoch": payload["train_state"]["epoch"],
        "world_size": ctx.world_size,
    }


def format_report(report: Dict[str, Any]) -> str:
    lines = [
        f"checkpoint: {report.get('checkpoint', '?')} (epoch {report['epoch']}, {report['weights']} weights"
        + (", flip TTA" if report["tta_flip"] else "") + ")",
        f"test images: {report['images']}",
        f"accuracy: {100 * report['accuracy']:.2f}%  ({report['correct']}/{report['images']})  loss {report['loss']:.4f}",
        "per class:",
    ]
    lines += [f"  {name:>12}: {100 * acc:.2f}%" for name, acc in report["per_class_accuracy"].items()]
    return "\n".join(lines)
