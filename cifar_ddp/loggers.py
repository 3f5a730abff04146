"""Every side effect a person sees - console lines, progress bars (or, without a
terminal, progress lines), TensorBoard, the markdown log - happens here, and only on
rank 0. Other ranks get a `SilentLogger` with the same methods, so callers never test
the rank. Also what the logger shows is chosen here: the run's hparams and its preview
of augmented images."""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, TextIO

import numpy as np
import torch

from .config import Config
from .data.loaders import AlbumentationsDataset
from .data.sources import DatasetArrays, ImageSplit
from .data.transforms import BatchAugment
from .files import atomic_write


class RunLogger:
    """What the trainer tells a person, one method per kind of news. Each does nothing
    here: `SilentLogger` (every rank but 0) is this as it is, `MainLogger` writes."""

    def start(self, cfg_dict: Dict[str, Any], info: Dict[str, Any],
              history: Sequence[Dict[str, Any]] = ()) -> None: ...
    def progress(self, iterable: Iterable, total: int, desc: str, initial: int = 0, images_per_step: int = 0,
                 run_step: int = 0, run_steps: int = 0) -> Iterable:
        return iterable
    def step(self, global_step: int, scalars: Dict[str, float]) -> None: ...
    def images(self, tag: str, batch: torch.Tensor, global_step: int) -> None: ...
    def epoch(self, epoch: int, total_epochs: int, row: Dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def figures(self, global_step: int, classes: Sequence[str], confusion, mistakes, images, labels,
                probabilities) -> None: ...
    def finish(self, hparams: Dict[str, Any], final: Dict[str, float],
               history: Sequence[Dict[str, Any]] = ()) -> None: ...
    def wall_time(self, parts: Dict[str, float]) -> None: ...


class SilentLogger(RunLogger):
    """What every rank but 0 uses: accepts every call, does nothing."""


class MainLogger(RunLogger):
    """TensorBoard events + training_log.md + console, under out_dir. Without
    `tensorboard` there is no SummaryWriter (torch.utils.tensorboard is not even imported);
    without `figures`, no curves.png (nor matplotlib). What the console and
    training_log.md say is the same either way."""

    # Without a terminal (a cluster's log file), a progress line this often inside an epoch.
    PROGRESS_EVERY_SECONDS = 30.0

    def __init__(self, out_dir: Path, progress_bar: bool = True, eval_split: str = "test",
                 tensorboard: bool = True, figures: bool = True) -> None:
        self.out_dir = out_dir
        # "val" when data.val_size carves the evaluation images out of the training split:
        # a recipe tuned on those must not be reported as a test figure.
        self.eval_split = eval_split
        out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.draws_figures = figures
        self.markdown = out_dir / "training_log.md"
        # A bar on a terminal; in a log file a bar's redraws are noise: lines instead.
        self.progress_bar = progress_bar and sys.stderr.isatty()
        self.progress_lines = progress_bar and not self.progress_bar
        self._bar = None
        self._started = time.time()

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def start(self, cfg_dict: Dict[str, Any], info: Dict[str, Any],
              history: Sequence[Dict[str, Any]] = ()) -> None:
        atomic_write(self.out_dir / "config.json", json.dumps(cfg_dict, indent=2).encode())
        if self.writer is not None:
            self.writer.add_text("config", "```\n" + json.dumps(cfg_dict, indent=2) + "\n```")
            self.writer.add_custom_scalars(self._overlaid_charts())
        self.message(" | ".join(f"{k}: {v}" for k, v in info.items()))
        # A resumed run keeps the header of the run it continues (its launch facts),
        # and its rows are rebuilt from the checkpoint's history: a crash between
        # logging an epoch and checkpointing it would otherwise log that epoch twice.
        resumed = bool(history) and self.markdown.exists()
        header = _markdown_header(self.markdown.read_text()) if resumed else None
        self._md_header = header or (
            "# Training log\n\n"
            + "".join(f"- {k}: {v}\n" for k, v in info.items())
            + f"\n| epoch | lr | train loss | train acc | {self.eval_split} loss | {self.eval_split} acc "
            "| time (s) | images/s |\n"
            + _TABLE_RULE
        )
        self._md_rows = [_markdown_row(entry["epoch"], entry) for entry in history]
        self._write_markdown()

    def _write_markdown(self, footer: str = "") -> None:
        atomic_write(self.markdown, (self._md_header + "".join(self._md_rows) + footer).encode())

    def _overlaid_charts(self) -> Dict[str, Dict[str, list]]:
        """TensorBoard's "custom scalars" tab: train and evaluation curves on one chart each."""
        split = self.eval_split
        return {f"train vs {split}": {
            "loss": ["Multiline", ["^train/loss$", f"^{split}/loss$"]],
            "accuracy": ["Multiline", ["^train/accuracy$", f"^{split}/accuracy$", f"^{split}/accuracy_tta$"]],
        }}

    def progress(self, iterable: Iterable, total: int, desc: str, initial: int = 0, images_per_step: int = 0,
                 run_step: int = 0, run_steps: int = 0) -> Iterable:
        """`iterable` (one item per step), shown as a bar or as progress lines.
        `run_step`/`run_steps`: steps of the whole run done before this epoch's first and in
        all; with `images_per_step` (the global batch) they give the lines' images/s and ETA."""
        if self.progress_lines:
            lines = ProgressLines(desc, total, initial, images_per_step, run_step, run_steps,
                                  every_seconds=self.PROGRESS_EVERY_SECONDS)
            return lines.track(iterable)
        if not self.progress_bar:
            return iterable
        from tqdm.auto import tqdm

        return self._tracked(tqdm(iterable, total=total, initial=initial, desc=desc, leave=False,
                                  dynamic_ncols=True))

    def _tracked(self, bar) -> Iterator:
        self._bar = bar
        try:
            yield from bar
        finally:
            bar.close()
            self._bar = None

    def step(self, global_step: int, scalars: Dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(self._tag(name), value, global_step)
        if self._bar is not None:
            self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)

    def images(self, tag: str, batch: torch.Tensor, global_step: int) -> None:
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        grid = make_grid(batch.float(), nrow=8, normalize=True, scale_each=True)
        self.writer.add_image(tag, grid, global_step)

    def epoch(self, epoch: int, total_epochs: int, row: Dict[str, Any]) -> None:
        step = row["global_step"]
        if self.writer is not None:
            for name in ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr",
                         "throughput/images_per_s", "test/accuracy_tta", "skipped_steps", "scaler_skipped_steps"):
                if name in row:
                    self.writer.add_scalar(self._tag(name), row[name], step)
            self.writer.flush()
        self._md_rows.append(_markdown_row(epoch, row))
        self._write_markdown()
        tta = f" (flip-TTA {100 * row['test/accuracy_tta']:.2f}%)" if "test/accuracy_tta" in row else ""
        scored = (f"{self.eval_split} loss {row['test/loss']:.4f} acc {100 * row['test/accuracy']:.2f}%{tta}"
                  if "test/accuracy" in row else f"{self.eval_split}: not evaluated (train.eval_every_epochs)")
        self.message(
            f"epoch {epoch}/{total_epochs}  lr {row['lr']:.4g}  train loss {row['train/loss']:.4f} "
            f"acc {100 * row['train/accuracy']:.2f}%  {scored}  {row['epoch_seconds']:.1f}s "
            f"{row['throughput/images_per_s']:.0f} img/s"
        )

    def _tag(self, name: str) -> str:
        """The TensorBoard tag of the trainer's name: "test/..." as the split evaluated,
        "lr" beside the other train/ scalars rather than a card of its own."""
        if name == "lr":
            return "train/lr"
        return self.eval_split + name[len("test"):] if name.startswith("test/") else name

    def _final_name(self, key: str) -> str:
        return key.replace("test_", self.eval_split + "_")

    def figures(self, global_step: int, classes: Sequence[str], confusion, mistakes, images, labels,
                probabilities) -> None:
        """TensorBoard pictures of an evaluation: the confusion matrix, the most confident
        mistakes with their labels, and one precision-recall curve per class (none without
        TensorBoard or figures)."""
        if self.writer is None or not self.draws_figures:
            return
        from . import report

        self.writer.add_figure(self._tag("test/confusion_matrix"), report.plot_confusion(confusion, classes),
                               global_step)
        if mistakes:
            captions = report.mistake_captions(mistakes, classes)
            gallery = report.plot_gallery(images[[i for _, i, _, _ in mistakes]], captions, columns=6)
            self.writer.add_figure(self._tag("test/most_confident_mistakes"), gallery, global_step)
        for k, name in enumerate(classes):
            self.writer.add_pr_curve(self._tag(f"test/pr_curve/{name}"), labels == k, probabilities[:, k], global_step)
        self.writer.flush()

    def finish(self, hparams: Dict[str, Any], final: Dict[str, float],
               history: Sequence[Dict[str, Any]] = ()) -> None:
        if self.writer is not None:
            self._write_hparams(hparams)
            self.writer.flush()
            self.writer.close()
        final = {self._final_name(k): v for k, v in final.items()}
        self._footer = "\n" + "".join(f"- final {k}: {v:.4f}\n" for k, v in final.items())
        self._write_markdown(self._footer)
        if history and self.draws_figures:
            from . import report

            # For people without TensorBoard: the run's curves as one picture.
            report.save(report.plot_curves(history, self.eval_split), self.out_dir / "curves.png")


    def wall_time(self, parts: Dict[str, float]) -> None:
        """Where the run's wall time went (timing.PhaseClock.breakdown): a table on the
        console, a list at the end of training_log.md."""
        from .timing import format_breakdown

        self.message("wall time:\n" + format_breakdown(parts))
        self._write_markdown(getattr(self, "_footer", "") + "\n## Where the wall time went\n\n"
                             + format_breakdown(parts, as_list=True) + "\n")

    def _write_hparams(self, hparams: Dict[str, Any]) -> None:
        """The run's settings for TensorBoard's HPARAMS tab, written into this run's own event
        file beside its scalars (SummaryWriter.add_hparams writes a second run,
        tensorboard/hparams, with one-point copies of them). Only the session summaries: left
        without an experiment summary, TensorBoard builds the experiment from all the runs it
        shows, with the settings that differ between them first (model.name for seed vs
        sep_resnet) and the runs' real scalars (test/accuracy, test/loss, ...) as metrics.
        One run's experiment summary would list its settings alphabetically instead, and
        the table shows the first five: five augment.* settings every run shares."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        _, session_start, session_end = hparams_summaries(hparams, {})
        self.writer.file_writer.add_summary(session_start)
        self.writer.file_writer.add_summary(session_end)


class ProgressLines:
    """Progress as lines, for logs without a terminal: one line when `every_seconds` have
    passed since the last (or `every_steps` steps, when set), with this epoch's images/s
    and the whole run's ETA at that rate (evaluations not counted). The first step is
    left out of the rate: it holds compilation and CUDA-graph capture."""

    def __init__(self, desc: str, total: int, initial: int = 0, images_per_step: int = 0, run_step: int = 0,
                 run_steps: int = 0, every_seconds: float = 30.0, every_steps: int = 0,
                 clock: Callable[[], float] = time.monotonic, stream: Optional[TextIO] = None) -> None:
        self.desc, self.total, self.initial = desc, total, initial
        self.images_per_step, self.run_step, self.run_steps = images_per_step, run_step, run_steps
        self.every_seconds, self.every_steps = every_seconds, every_steps
        self.clock = clock
        self.stream = stream
        self._first: Optional[tuple] = None      # (step, time) after the first step
        self._last: Optional[tuple] = None       # (step, time) of the last line

    def track(self, iterable: Iterable) -> Iterator:
        step = self.initial
        for item in iterable:
            yield item
            # The consumer asks for the next item once it has run (queued) this one.
            step += 1
            self.update(step)

    def update(self, step: int) -> None:
        """`step` steps of this epoch are done."""
        now = self.clock()
        if self._first is None:
            self._first = self._last = (step, now)
            return
        due = now - self._last[1] >= self.every_seconds or (self.every_steps and step - self._last[0] >= self.every_steps)
        if due and step < self.total:   # the epoch's own line reports its end
            self._last = (step, now)
            print(self.line(step, now), file=self.stream or sys.stderr, flush=True)

    def line(self, step: int, now: float) -> str:
        first_step, first_time = self._first
        steps_per_second = (step - first_step) / max(now - first_time, 1e-9)
        text = f"{self.desc}  step {step}/{self.total} ({step / max(self.total, 1):.0%})"
        if self.images_per_step:
            text += f"  {steps_per_second * self.images_per_step:,.0f} img/s"
        if self.run_steps:
            left = max(self.run_steps - (self.run_step - self.initial + step), 0)
            text += f"  run ETA {datetime.timedelta(seconds=round(left / steps_per_second))}"
        return text


def run_hparams(cfg: Config, world_size: int) -> Dict[str, Any]:
    """The settings TensorBoard's HPARAMS tab compares runs by, under their config names:
    the model (name, its args and widths) and every augment.* setting among them, so that
    runs of different networks or recipes can be told apart."""
    t, m = cfg.train, cfg.model
    values: Dict[str, Any] = {
        "model.name": m.name, "model.widths": ",".join(map(str, m.widths)) or "default",
        "model.dropout": m.dropout, "model.zero_init_residual": m.zero_init_residual,
        **{f"model.args.{k}": v for k, v in _flatten(m.args).items()},
        **{f"augment.{k}": v for k, v in dataclasses.asdict(cfg.augment).items()},
        "train.epochs": t.epochs, "train.batch_size": t.batch_size, "world_size": world_size, "train.lr": t.lr,
        "train.optimizer": t.optimizer, "train.schedule": t.schedule, "train.weight_decay": t.weight_decay,
        "train.label_smoothing": t.label_smoothing, "train.ema_decay": t.ema_decay,
        "train.precision": t.precision, "seed": cfg.seed,
    }
    # The hparams plugin holds numbers and strings (torch writes a bool as the number 0/1:
    # written as the config says it instead).
    return {k: ("true" if v else "false") if isinstance(v, bool) else v if isinstance(v, (int, float, str)) else str(v)
            for k, v in values.items()}


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


PREVIEW_IMAGES = 32


def preview_indices(labels: np.ndarray, count: int = PREVIEW_IMAGES) -> np.ndarray:
    """`count` image indices spread over the split with the classes taken in turn (an
    image folder lists one class after another, so its first images are all one class):
    every class is present while count allows, each class's images spread over its run."""
    classes = np.unique(labels)
    per_class = -(-count // max(len(classes), 1))
    picks = []
    for k in classes:
        members = np.flatnonzero(labels == k)
        picks.append(members[np.linspace(0, len(members) - 1, min(per_class, len(members))).astype(int)])
    # Round-robin: the first of every class, then the second of every class, ...
    order = [column[i] for i in range(per_class) for column in picks if i < len(column)]
    return np.asarray(order[:count], dtype=np.int64)


def augmented_preview(data: DatasetArrays, cfg: Config) -> torch.Tensor:
    """PREVIEW_IMAGES augmented training images (preview_indices), drawn with their own
    generator so showing them changes nothing in the training run's random stream."""
    assert data.train is not None
    chosen = preview_indices(data.train.labels)
    subset = ImageSplit(data.train.images[chosen], data.train.labels[chosen])
    if cfg.augment.backend == "tensor":
        return BatchAugment(cfg.augment, data.stats)(torch.from_numpy(subset.images),
                                                      torch.Generator().manual_seed(cfg.seed))
    dataset = AlbumentationsDataset(subset, cfg.augment, data.stats)
    dataset.pipeline.set_random_seed(cfg.seed)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


_TABLE_RULE = "|---:|---:|---:|---:|---:|---:|---:|---:|\n"


def _markdown_header(text: str) -> Optional[str]:
    """Everything up to and including the table's rule line; None if there is none."""
    end = text.find(_TABLE_RULE)
    return text[:end + len(_TABLE_RULE)] if end >= 0 else None


def _markdown_row(epoch: int, row: Dict[str, Any]) -> str:
    scored = (f"{row['test/loss']:.4f} | {100 * row['test/accuracy']:.2f}%" if "test/accuracy" in row
              else "- | -")      # an epoch train.eval_every_epochs skips
    return (f"| {epoch} | {row['lr']:.4g} | {row['train/loss']:.4f} | {100 * row['train/accuracy']:.2f}% | "
            f"{scored} | {row['epoch_seconds']:.1f} | {row['throughput/images_per_s']:.0f} |\n")


def make_logger(is_main: bool, out_dir: Path, progress_bar: bool = True, eval_split: str = "test",
                tensorboard: bool = True, figures: bool = True) -> RunLogger:
    return MainLogger(out_dir, progress_bar, eval_split, tensorboard, figures) if is_main else SilentLogger()


__all__ = ["RunLogger", "SilentLogger", "MainLogger", "ProgressLines", "make_logger", "run_hparams", "preview_indices",
           "augmented_preview"]
