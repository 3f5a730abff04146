"""Score a saved checkpoint on the split its run evaluated on: the test split, or the
validation carve (`val`) when its config has data.val_size > 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config
from .data.loaders import eval_shard
from .data.sources import ChannelStats, load_dataset
from .distributed import DistContext
from . import metrics
from .assembly import build_training_model, class_names, eval_split
from .engine import evaluate
from .inference import NormalizedModel, checkpoint_weights, uint8_to_input
from .models import cam_layer_name, find_layer
from .step import resolve_precision


def evaluate_checkpoint(payload: Dict[str, Any], cfg: Config, ctx: DistContext,
                        tta_flip: bool = False, source: str = "checkpoint", report_dir: Optional[Path] = None,
                        gallery: int = 25, cam_layer: str = "") -> Dict[str, Any]:
    """Score the checkpoint on its evaluation split (`eval_split`); with `tta_flip`, also
    with flip TTA (`accuracy_tta`, beside the plain `accuracy`); with `report_dir`, rank 0
    also writes the report there (report.write_report) from the gathered figures."""
    # Normalization uses the training statistics stored with the checkpoint, so a
    # folder holding only test/ is enough.
    stats = ChannelStats.from_payload(payload["stats"])
    # The model before the data: a model that cannot be built stops before the data loads.
    model = build_training_model(cfg, ctx)
    ckpt.check_architecture(payload, model.state_dict(), source,
                            advice="(drop the model.* overrides), or pass a checkpoint of this architecture")
    # Only the report looks at a layer (finding the default one runs a forward pass).
    if report_dir is not None:
        from . import report   # matplotlib: only for a report

        cam_layer = cam_layer or report.default_cam_layer(model, cam_layer_name(cfg.model, model))
        layer = find_layer(model, cam_layer)
    data = load_dataset(cfg.data, seed=cfg.seed, with_train=False, stats=stats, classes=class_names(cfg))
    state, uses_ema = checkpoint_weights(payload)   # the weights the run itself evaluated
    model.load_state_dict(state)
    precision = resolve_precision(cfg.train.precision, ctx.device)
    split = eval_split(cfg)
    shard = eval_shard(data.test, ctx.rank, ctx.world_size)
    # TTA is an addition, never a replacement: the plain figure stays comparable with the
    # training log's, and the report's per-class numbers and mistakes are the plain ones.
    # Both come from the same forward passes (each image and its mirror in one batch).
    result = evaluate(model, shard, stats, ctx, precision, cfg.model.num_classes,
                      channels_last=cfg.train.channels_last, keep_mistakes=gallery if report_dir else 0,
                      with_tta_accuracy=tta_flip)
    numbers = metrics.report_numbers(result, data.classes)
    paths = data.test.paths
    if report_dir is not None and ctx.is_main:
        viewer = NormalizedModel(model, stats.mean, stats.std).to(ctx.device).eval()
        header = {"checkpoint": source, "epoch": payload["train_state"]["epoch"],
                  "weights": "EMA" if uses_ema else "raw", f"{split} images": result.total,
                  "accuracy": f"{result.accuracy:.2%}",
                  **({"accuracy with flip TTA": f"{result.accuracy_tta:.2%}"} if tta_flip else {}),
                  "loss": f"{result.loss:.4f}", "Grad-CAM layer": cam_layer}
        report.write_report(report_dir, result, header, data.classes, data.test.images, viewer.float(), layer,
                            ctx.device, correct_indices=_first_correct(viewer, data.test, ctx.device),
                            split=split, paths=paths)
    return {
        "split": split,
        "images": result.total,
        "accuracy": result.accuracy,
        **({"accuracy_tta": result.accuracy_tta, "correct_tta": result.correct_tta, "loss_tta": result.loss_tta}
           if tta_flip else {}),
        "loss": result.loss,
        "correct": result.correct,
        "per_class_accuracy": dict(zip(data.classes, result.per_class_accuracy)),
        "weights": "ema" if uses_ema else "model",
        "tta_flip": tta_flip,
        "epoch": payload["train_state"]["epoch"],
        "world_size": ctx.world_size,
        **numbers,
        **({"mistakes": [{"confidence": c, "index": i, "true": data.classes[t], "predicted": data.classes[p],
                          **({"path": paths[i]} if paths else {})}
                         for c, i, t, p in result.mistakes]} if result.mistakes else {}),
    }


def _first_correct(model: nn.Module, split, device: torch.device, look_at: int = 500) -> List[int]:
    """Correctly classified images of as many different classes as possible (Grad-CAM's
    contrast), from images spread evenly over the split (folders list a class at a time)."""
    candidates = np.linspace(0, len(split) - 1, min(look_at, len(split))).astype(int)
    images = uint8_to_input(split.images[candidates]).to(device)
    with torch.no_grad():
        predicted = model(images).argmax(1).cpu().numpy()
    right = candidates[predicted == split.labels[candidates]]
    first_of_class = {}
    for index in right:
        first_of_class.setdefault(int(split.labels[index]), int(index))
    return list(first_of_class.values()) + [int(i) for i in right if int(i) not in first_of_class.values()]


def format_report(figures: Dict[str, Any]) -> str:
    lines = [
        f"checkpoint: {figures.get('checkpoint', '?')} (epoch {figures['epoch']}, {figures['weights']} weights)",
        f"{figures['split']} images: {figures['images']}",
        f"accuracy: {100 * figures['accuracy']:.2f}%  ({figures['correct']}/{figures['images']})  loss {figures['loss']:.4f}"
        f"  ECE {figures['ece']:.4f}",
    ]
    if "accuracy_tta" in figures:
        lines.append(f"accuracy with flip TTA: {100 * figures['accuracy_tta']:.2f}%  "
                     f"({figures['correct_tta']}/{figures['images']})  loss {figures['loss_tta']:.4f}")
    lines.append(f"{'class':>12}  accuracy  precision  recall     F1")
    lines += [f"{name:>12}  {100 * acc:7.2f}%  {figures['per_class'][name]['precision']:9.3f}  "
              f"{figures['per_class'][name]['recall']:6.3f}  {figures['per_class'][name]['f1']:5.3f}"
              for name, acc in figures["per_class_accuracy"].items()]
    return "\n".join(lines)
