"""What a trained model learned, as pictures and pages: the confusion matrix, a
reliability diagram, the most confident mistakes and where the model looked (Grad-CAM).
The numbers they show come from metrics.py.

The pictures are drawn by rank 0 with matplotlib (Agg: no display needed), imported on
first use so that importing the trainer does not load it, and pytorch-grad-cam.
`write_report` writes DIR/report.md and DIR/index.html (the same content rendered by the
`markdown` package, viewable offline) next to the PNG files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import metrics
from .engine import EvalResult
from .inference import uint8_to_input

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CORRECT_FOR_CONTRAST = 5
# Pictures are saved at DPI dots per inch and the page is PAGE_WIDTH_PX wide: a figure
# at most PAGE_WIDTH_IN wide is shown at its own size, so its captions keep their size.
DPI = 100
PAGE_WIDTH_PX = 1100
PAGE_WIDTH_IN = PAGE_WIDTH_PX / DPI


def pyplot():
    """matplotlib.pyplot, on the Agg backend unless a program (a notebook) chose one first."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mistake_captions(mistakes, classes: Sequence[str]) -> List[str]:
    """One caption per (confidence, index, true, predicted) mistake: the report's gallery
    and TensorBoard's say the same."""
    return [f"true {classes[t]}\npredicted {classes[p]} ({c:.0%})" for c, _, t, p in mistakes]


# ----------------------------------------------------------------- pictures


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    plt = pyplot()
    m = np.asarray(confusion, dtype=np.float64)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 5.2))
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


def plot_reliability(bins: Sequence[Sequence[float]]) -> Figure:
    plt = pyplot()
    b = np.asarray(bins, dtype=np.float64)
    edges = np.linspace(0, 1, len(b) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    filled = b[:, 0] > 0
    accuracy = np.where(filled, b[:, 2] / np.maximum(b[:, 0], 1), 0)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[filled], accuracy[filled], width=1 / len(b), edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(f"reliability diagram (ECE {metrics.expected_calibration_error(bins):.3f})")
    ax.legend(loc="upper left")
    hist.bar(centres, b[:, 0], width=1 / len(b), edgecolor="black")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig


def plot_gallery(images: np.ndarray, captions: Sequence[str], columns: int = 5, overlays=None) -> Figure:
    """A grid of pictures (N x 32 x 32 x 3 uint8), each with its caption, `columns` to a
    row and no wider than the page; with `overlays` (N x 32 x 32 in [0, 1]) each picture
    is followed by its Grad-CAM map, and a colour bar says what the colours mean."""
    plt = pyplot()
    per_item = 2 if overlays is not None else 1
    n = len(images)
    cols = columns * per_item
    rows = max(1, -(-n * per_item // cols))
    # Panels of up to 2.1 in: a two-line caption at 9 pt fits above each; at most one page wide.
    panel = min(2.1, PAGE_WIDTH_IN / cols)
    bar_height = 0.6 if overlays is not None else 0.0
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel, rows * (panel + 0.45) + bar_height),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    mappable = None
    for i in range(n):
        slot = i * per_item
        ax = axes.flat[slot]
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(captions[i], fontsize=9)
        if overlays is not None:
            cam_ax = axes.flat[slot + 1]
            cam_ax.imshow(images[i], interpolation="bilinear")
            mappable = cam_ax.imshow(overlays[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            cam_ax.set_title("Grad-CAM", fontsize=9)
    if mappable is not None:
        # Grad-CAM scales each map to [0, 1] on its own: 1 is the picture's strongest evidence.
        bar = fig.colorbar(mappable, ax=axes, orientation="horizontal", location="bottom",
                           fraction=0.15 / (rows * (panel + 0.45) + bar_height), pad=0.01, shrink=0.5, aspect=40)
        bar.set_label("Grad-CAM, each map scaled to its own strongest evidence (1) for the predicted class",
                      fontsize=9)
        bar.solids.set_alpha(1)
    return fig


def grad_cam(model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    """Grad-CAM maps (N x H x W in [0, 1], at the input's size) of `targets`' logits at `layer`."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])


# Grad-CAM upsamples its layer's map to 32 x 32: a 2 x 2 map is a blob per quadrant.
MIN_CAM_MAP = 4


@torch.no_grad()
def default_cam_layer(model: nn.Module, preferred: str, input_size: int = 32) -> str:
    """`preferred` (the model's own choice, models.cam_layer_name) when its output map is at
    least MIN_CAM_MAP x MIN_CAM_MAP, else the last top-level block whose map is (c3 for the
    seed, whose c4 is 2 x 2); `preferred` when no block's is."""
    sizes: Dict[str, tuple] = {}
    names = {module: name for name, module in model.named_modules() if name}

    def record(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            sizes[names[module]] = tuple(output.shape)

    handles = [module.register_forward_hook(record) for module in names]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        model(torch.zeros(1, 3, input_size, input_size, device=param.device if param is not None else None))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    def detailed(name: str) -> bool:
        shape = sizes.get(name, ())
        return len(shape) == 4 and min(shape[-2:]) >= MIN_CAM_MAP

    if detailed(preferred):
        return preferred
    blocks = [name for name, _ in model.named_children() if detailed(name)]
    return blocks[-1] if blocks else preferred


def plot_curves(history: Sequence[Dict[str, Any]], eval_split: str = "test") -> Figure:
    """Loss, accuracy and learning rate against epoch, training vs evaluation split, from the
    trainer's per-epoch rows (what training_log.md holds)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)


# ----------------------------------------------------------------- the report


def write_report(directory: Path, result: EvalResult, header: Dict[str, Any], classes: Sequence[str],
                 split_images: np.ndarray, model: nn.Module, cam_layer: nn.Module, device: torch.device,
                 correct_indices: Sequence[int] = (), split: str = "test",
                 paths: Optional[Sequence[str]] = None) -> List[Path]:
    """Write the pictures, report.md and index.html into `directory`; return the files.
    `split_images`: the whole evaluated split (N x 32 x 32 x 3 uint8), indexed by the
    mistakes' split indices, and `paths` its files (folder data) to name each mistake by;
    `split` names it ("test" or "val"); `model` takes float RGB in [0, 1]
    (inference.NormalizedModel)."""
    directory.mkdir(parents=True, exist_ok=True)
    numbers = metrics.report_numbers(result, classes)
    save(plot_confusion(result.confusion, classes), directory / "confusion.png")
    save(plot_reliability(result.calibration), directory / "reliability.png")
    written = [directory / "confusion.png", directory / "reliability.png"]

    mistakes = result.mistakes
    if mistakes:
        pictures = split_images[[i for _, i, _, _ in mistakes]]
        captions = mistake_captions(mistakes, classes)
        save(plot_gallery(pictures, captions), directory / "mistakes.png")
        contrast = list(correct_indices)[:CORRECT_FOR_CONTRAST]
        cam_images = np.concatenate([pictures, split_images[contrast]]) if contrast else pictures
        inputs = uint8_to_input(cam_images).to(device)
        with torch.no_grad():
            predicted = model(inputs).argmax(1).tolist()
        maps = grad_cam(model, cam_layer, inputs, predicted)
        cam_captions = captions + [f"correct: {classes[p]}" for p in predicted[len(pictures):]]
        save(plot_gallery(cam_images, cam_captions, columns=3, overlays=maps), directory / "gradcam.png")
        written += [directory / "mistakes.png", directory / "gradcam.png"]

    markdown = _markdown(header, numbers, mistakes, classes, split, paths)
    (directory / "report.md").write_text(markdown)
    (directory / "index.html").write_text(_html(markdown))
    return written + [directory / "report.md", directory / "index.html"]


def _markdown(header: Dict[str, Any], numbers: Dict[str, Any], mistakes, classes, split: str = "test",
              paths: Optional[Sequence[str]] = None) -> str:
    lines = ["# Evaluation report", ""]
    lines += [f"- {key}: {_cell(value)}" for key, value in header.items()]
    lines += [f"- expected calibration error (15 bins): {numbers['ece']:.4f}", "",
              "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, m in numbers["per_class"].items():
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    lines += ["", "## Confusion matrix", "", "![confusion matrix](confusion.png)", "", "Most confused pairs:", ""]
    lines += [f"- {p['true']} taken for {p['predicted']}: {p['images']} images" for p in numbers["most_confused"]]
    lines += ["", "## Calibration", "", "![reliability diagram](reliability.png)", ""]
    if mistakes:
        lines += ["## The most confident mistakes", "", "![most confident mistakes](mistakes.png)", "",
                  f"| # | {split} image | true | predicted | confidence |" + (" file |" if paths else ""),
                  "|---:|---:|---|---|---:|" + ("---|" if paths else "")]
        lines += [f"| {k + 1} | {i} | {classes[t]} | {classes[p]} | {c:.1%} |"
                  + (f" `{_cell(paths[i])}` |" if paths else "")
                  for k, (c, i, t, p) in enumerate(mistakes)]
        lines += ["", "## Where the model looked (Grad-CAM)", "",
                  f"For each mistake above, then {CORRECT_FOR_CONTRAST} correctly classified images for contrast: "
                  "the picture and the Grad-CAM map of the predicted class.", "", "![Grad-CAM](gradcam.png)", ""]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    """A value safe inside a markdown table cell or list item (a path may hold '|' or '`')."""
    return str(value).replace("|", "\\|").replace("`", "'")


# Borders and padding for the tables, numbers right-aligned (markdown's "---:" columns),
# pictures at most the page's width.
_STYLE = f"""
body {{ font-family: system-ui, sans-serif; max-width: {PAGE_WIDTH_PX}px; margin: 1em auto; padding: 0 1em;
       line-height: 1.4; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #bbb; padding: 3px 10px; }}
th {{ background: #f0f0f0; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
code {{ font-size: 0.9em; word-break: break-all; }}
img {{ max-width: 100%; height: auto; }}
h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }}
"""


def _html(markdown_text: str) -> str:
    """The same content as report.md, as a self-contained page (the PNGs sit beside it);
    the "tables" extension gives each table its <thead> and <tbody>."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>Evaluation report</title>\n"
            f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


__all__ = ["plot_confusion", "plot_reliability", "plot_gallery", "plot_curves", "grad_cam", "default_cam_layer",
           "mistake_captions", "pyplot", "save", "write_report"]
