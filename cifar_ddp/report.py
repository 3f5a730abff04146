"""What a trained model learned, as numbers and pictures: per-class precision / recall /
F1, the confusion matrix, calibration (expected calibration error and a reliability
diagram), the most confident mistakes and where the model looked (Grad-CAM).

The numbers come from `engine.evaluate`'s exact counts (summed over ranks); the pictures
are drawn by rank 0 with matplotlib (Agg: no display needed) and pytorch-grad-cam.
`write_report` writes DIR/report.md and DIR/index.html (the same content, pictures side
by side, viewable offline) next to the PNG files.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Dict, List, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .engine import EvalResult  # noqa: E402
from .inference import uint8_to_input  # noqa: E402

CORRECT_FOR_CONTRAST = 5


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


def summary(result: EvalResult, classes: Sequence[str]) -> Dict[str, Any]:
    """The report's numbers, for --json and report.md."""
    return {"confusion_matrix": result.confusion, "per_class": class_metrics(result.confusion, classes),
            "ece": expected_calibration_error(result.calibration),
            "most_confused": most_confused(result.confusion, classes)}


# ----------------------------------------------------------------- pictures


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> plt.Figure:
    m = np.asarray(confusion, dtype=np.float64)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, values, title, fmt in ((axes[0], m, "counts", "{:.0f}"), (axes[1], rows, "share of each true class", "{:.2f}")):
        ax.imshow(values, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix ({title})")
        top = values.max() or 1
        for t in range(len(classes)):
            for p in range(len(classes)):
                ax.text(p, t, fmt.format(values[t, p]), ha="center", va="center", fontsize=7,
                        color="white" if values[t, p] > top / 2 else "black")
    fig.tight_layout()
    return fig


def plot_reliability(bins: Sequence[Sequence[float]]) -> plt.Figure:
    b = np.asarray(bins, dtype=np.float64)
    edges = np.linspace(0, 1, len(b) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    filled = b[:, 0] > 0
    accuracy = np.where(filled, b[:, 2] / np.maximum(b[:, 0], 1), 0)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[filled], accuracy[filled], width=1 / len(b), edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(f"reliability diagram (ECE {expected_calibration_error(bins):.3f})")
    ax.legend(loc="upper left")
    hist.bar(centres, b[:, 0], width=1 / len(b), edgecolor="black")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig


def plot_gallery(images: np.ndarray, captions: Sequence[str], columns: int = 5, overlays=None) -> plt.Figure:
    """A grid of pictures (N x 32 x 32 x 3 uint8, drawn 4x larger), each with its caption;
    with `overlays` (N x 32 x 32 in [0, 1]) each picture is followed by its Grad-CAM."""
    per_item = 2 if overlays is not None else 1
    n = len(images)
    cols = columns * per_item
    rows = max(1, -(-n * per_item // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        slot = i * per_item
        ax = axes.flat[slot]
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(captions[i], fontsize=8)
        if overlays is not None:
            cam_ax = axes.flat[slot + 1]
            cam_ax.imshow(images[i], interpolation="bilinear")
            cam_ax.imshow(overlays[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            cam_ax.set_title("Grad-CAM", fontsize=8)
    fig.tight_layout()
    return fig


def grad_cam(model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    """Grad-CAM maps (N x H x W in [0, 1], at the input's size) of `targets`' logits at `layer`."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def plot_curves(history: Sequence[Dict[str, Any]], eval_split: str = "test") -> plt.Figure:
    """Loss, accuracy and learning rate against epoch, training vs evaluation split, from the
    trainer's per-epoch rows (what training_log.md holds)."""
    epochs = [row["epoch"] for row in history]
    fig, (loss, accuracy, lr) = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, label in ((loss, "loss", "loss"), (accuracy, "accuracy", "accuracy (%)")):
        scale = 100 if key == "accuracy" else 1
        ax.plot(epochs, [scale * row[f"train/{key}"] for row in history], marker=".", label="train")
        scored = [row for row in history if f"test/{key}" in row]     # train.eval_every_epochs may skip some
        ax.plot([row["epoch"] for row in scored], [scale * row[f"test/{key}"] for row in scored], marker=".",
                label=eval_split)
        if key == "accuracy" and scored and all("test/accuracy_tta" in row for row in scored):
            ax.plot([row["epoch"] for row in scored], [100 * row["test/accuracy_tta"] for row in scored],
                    marker=".", ls="--", label=f"{eval_split}, flip TTA")
        ax.set_ylabel(label)
        ax.legend()
    lr.plot(epochs, [row["lr"] for row in history], marker=".")
    lr.set_ylabel("learning rate (at the epoch's end)")
    for ax in (loss, accuracy, lr):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@torch.no_grad()
def probabilities(model: nn.Module, images: np.ndarray, stats, device: torch.device,
                  batch_size: int = 500) -> np.ndarray:
    """Softmax of `model` (the training model: normalized input) over N x 32 x 32 x 3 uint8."""
    from .data.loaders import eval_batches
    from .data.sources import ImageSplit

    model.eval()
    split = ImageSplit(images, np.zeros(len(images), dtype=np.int64))
    out = [model(x.float()).float().softmax(1).cpu() for x, _ in eval_batches(split, stats, batch_size, device)]
    return torch.cat(out).numpy()


def save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------- the report


def write_report(directory: Path, result: EvalResult, header: Dict[str, Any], classes: Sequence[str],
                 split_images: np.ndarray, model: nn.Module, cam_layer: nn.Module, device: torch.device,
                 correct_indices: Sequence[int] = ()) -> List[Path]:
    """Write the pictures, report.md and index.html into `directory`; return the files.
    `split_images`: the whole evaluated split (N x 32 x 32 x 3 uint8), indexed by the
    mistakes' split indices; `model` takes float RGB in [0, 1] (inference.NormalizedModel)."""
    directory.mkdir(parents=True, exist_ok=True)
    numbers = summary(result, classes)
    save(plot_confusion(result.confusion, classes), directory / "confusion.png")
    save(plot_reliability(result.calibration), directory / "reliability.png")
    written = [directory / "confusion.png", directory / "reliability.png"]

    mistakes = result.mistakes
    if mistakes:
        pictures = split_images[[i for _, i, _, _ in mistakes]]
        captions = [f"true {classes[t]}\npredicted {classes[p]} ({c:.0%})" for c, _, t, p in mistakes]
        save(plot_gallery(pictures, captions), directory / "mistakes.png")
        contrast = list(correct_indices)[:CORRECT_FOR_CONTRAST]
        cam_images = np.concatenate([pictures, split_images[contrast]]) if contrast else pictures
        inputs = uint8_to_input(cam_images).to(device)
        with torch.no_grad():
            predicted = model(inputs).argmax(1).tolist()
        maps = grad_cam(model, cam_layer, inputs, predicted)
        cam_captions = captions + [f"correct: {classes[p]}" for p in predicted[len(pictures):]]
        save(plot_gallery(cam_images, cam_captions, overlays=maps), directory / "gradcam.png")
        written += [directory / "mistakes.png", directory / "gradcam.png"]

    markdown = _markdown(header, numbers, mistakes, classes)
    (directory / "report.md").write_text(markdown)
    (directory / "index.html").write_text(_html(markdown))
    return written + [directory / "report.md", directory / "index.html"]


def _markdown(header: Dict[str, Any], numbers: Dict[str, Any], mistakes, classes) -> str:
    lines = ["# Evaluation report", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [f"- expected calibration error (15 bins): {numbers['ece']:.4f}", "",
              "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, m in numbers["per_class"].items():
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    lines += ["", "## Confusion matrix", "", "![confusion matrix](confusion.png)", "", "Most confused pairs:", ""]
    lines += [f"- {p['true']} taken for {p['predicted']}: {p['images']} images" for p in numbers["most_confused"]]
    lines += ["", "## Calibration", "", "![reliability diagram](reliability.png)", ""]
    if mistakes:
        lines += ["## The most confident mistakes", "", "![most confident mistakes](mistakes.png)", "",
                  "| # | test image | true | predicted | confidence |", "|---:|---:|---|---|---:|"]
        lines += [f"| {k + 1} | {i} | {classes[t]} | {classes[p]} | {c:.1%} |"
                  for k, (c, i, t, p) in enumerate(mistakes)]
        lines += ["", "## Where the model looked (Grad-CAM)", "",
                  f"For each mistake above, then {CORRECT_FOR_CONTRAST} correctly classified images for contrast: "
                  "the picture and the Grad-CAM map of the predicted class.", "", "![Grad-CAM](gradcam.png)", ""]
    return "\n".join(lines) + "\n"


def _html(markdown: str) -> str:
    """The same content as report.md, as a self-contained page (the PNGs sit beside it)."""
    body, table = [], []

    def flush_table():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-:")]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            body.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if k == 0 else 'td'}>{c}</{'th' if k == 0 else 'td'}>" for c in row) + "</tr>"
                for k, row in enumerate(cells)) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}" style="max-width:100%"></p>')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto} td,th{padding:2px 8px;text-align:right}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Evaluation report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


__all__ = ["class_metrics", "expected_calibration_error", "most_confused", "summary", "plot_confusion",
           "plot_reliability", "plot_gallery", "plot_curves", "probabilities", "grad_cam", "write_report"]
