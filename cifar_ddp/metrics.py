"""The evaluation report's numbers, as pure arithmetic on `engine.evaluate`'s exact counts
(summed over ranks): per-class precision / recall / F1, the most confused pairs, and the
expected calibration error. No pictures here (report.py draws them), so this module
loads neither matplotlib nor a model."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from .engine import EvalResult


def class_metrics(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Precision, recall, F1 and support per class, from a [true][predicted] count matrix."""
    m = np.asarray(confusion, dtype=np.float64)
    out = {}
    for i, name in enumerate(classes):
        tp, predicted, support = m[i, i], m[:, i].sum(), m[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support)}
    return out


def expected_calibration_error(bins: Sequence[Sequence[float]]) -> float:
    """sum over bins of (share of images) x |accuracy - mean confidence|."""
    total = sum(b[0] for b in bins)
    return float(sum(abs(b[2] - b[1]) for b in bins if b[0]) / total) if total else 0.0


def most_confused(confusion: Sequence[Sequence[int]], classes: Sequence[str], count: int = 5) -> List[Dict[str, Any]]:
    pairs = [(n, classes[t], classes[p]) for t, row in enumerate(confusion) for p, n in enumerate(row) if t != p and n]
    pairs.sort(key=lambda x: -x[0])
    return [{"true": t, "predicted": p, "images": int(n)} for n, t, p in pairs[:count]]


def report_numbers(result: EvalResult, classes: Sequence[str]) -> Dict[str, Any]:
    """The report's numbers, for --json and report.md."""
    return {"confusion_matrix": result.confusion, "per_class": class_metrics(result.confusion, classes),
            "ece": expected_calibration_error(result.calibration),
            "most_confused": most_confused(result.confusion, classes)}


__all__ = ["class_metrics", "expected_calibration_error", "most_confused", "report_numbers"]
