"""Every side effect a person sees - console lines, progress bars, TensorBoard,
the markdown log - happens here, and only on rank 0. Other ranks get a
`SilentLogger` with the same methods, so callers never test the rank."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence

import torch

from .files import atomic_write


class SilentLogger:
    """What every rank but 0 uses: accepts every call, does nothing."""

    def start(self, cfg_dict: Dict[str, Any], info: Dict[str, Any],
              history: Sequence[Dict[str, Any]] = ()) -> None: ...
    def progress(self, iterable: Iterable, total: int, desc: str, initial: int = 0) -> Iterable:
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


class MainLogger(SilentLogger):
    """TensorBoard events + training_log.md + console, under out_dir."""

    def __init__(self, out_dir: Path, progress_bar: bool = True, eval_split: str = "test") -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = out_dir
        # "val" when data.val_size carves the evaluation images out of the training split:
        # a recipe tuned on those must not be reported as a test figure.
        self.eval_split = eval_split
        out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.markdown = out_dir / "training_log.md"
        self.progress_bar = progress_bar and sys.stderr.isatty()
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
        self.writer.add_text("config", "```\n" + json.dumps(cfg_dict, indent=2) + "\n```")
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

    def progress(self, iterable: Iterable, total: int, desc: str, initial: int = 0) -> Iterable:
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
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step)
        if self._bar is not None:
            self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)

    def images(self, tag: str, batch: torch.Tensor, global_step: int) -> None:
        from torchvision.utils import make_grid

        grid = make_grid(batch.float(), nrow=8, normalize=True, scale_each=True)
        self.writer.add_image(tag, grid, global_step)

    def epoch(self, epoch: int, total_epochs: int, row: Dict[str, Any]) -> None:
        step = row["global_step"]
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
        return self.eval_split + name[len("test"):] if name.startswith("test/") else name

    def _final_name(self, key: str) -> str:
        return key.replace("test_", self.eval_split + "_")

    def figures(self, global_step: int, classes: Sequence[str], confusion, mistakes, images, labels,
                probabilities) -> None:
        """TensorBoard pictures of an evaluation: the confusion matrix, the most confident
        mistakes with their labels, and one precision-recall curve per class."""
        from . import report

        self.writer.add_figure(self._tag("test/confusion_matrix"), report.plot_confusion(confusion, classes),
                               global_step)
        if mistakes:
            captions = [f"true {classes[t]}\npredicted {classes[p]} ({c:.0%})" for c, _, t, p in mistakes]
            gallery = report.plot_gallery(images[[i for _, i, _, _ in mistakes]], captions, columns=6)
            self.writer.add_figure(self._tag("test/most_confident_mistakes"), gallery, global_step)
        for k, name in enumerate(classes):
            self.writer.add_pr_curve(self._tag(f"test/pr_curve/{name}"), labels == k, probabilities[:, k], global_step)
        self.writer.flush()

    def finish(self, hparams: Dict[str, Any], final: Dict[str, float],
               history: Sequence[Dict[str, Any]] = ()) -> None:
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        final = {self._final_name(k): v for k, v in final.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in final.items()}, run_name="hparams")
        self.writer.flush()
        self.writer.close()
        self._footer = "\n" + "".join(f"- final {k}: {v:.4f}\n" for k, v in final.items())
        self._write_markdown(self._footer)
        if history:
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


def make_logger(is_main: bool, out_dir: Path, progress_bar: bool = True, eval_split: str = "test") -> SilentLogger:
    return MainLogger(out_dir, progress_bar, eval_split) if is_main else SilentLogger()


__all__ = ["SilentLogger", "MainLogger", "make_logger"]
