"""What a person reads of a run: TensorBoard's hparams inside the run itself, its charts, the
preview of augmented images, and the progress lines of a log without a terminal."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_ddp.config import AugmentConfig, load_config
from cifar_ddp.data.sources import ChannelStats, DatasetArrays, ImageSplit
from cifar_ddp.data.transforms import normalize_batch
from cifar_ddp.loggers import MainLogger, ProgressLines, augmented_preview, preview_indices, run_hparams

from conftest import JOB_TIMEOUT_S, REPO, job_env, tiny_overrides, train_in_process


def _events(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return events


def _hparams(events):
    """hparam name -> value, from the hparams plugin data in one run's events."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    # No experiment summary: TensorBoard builds it from every run shown, the settings that
    # differ between runs first (one run's would list them alphabetically: augment.* first).
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == 1   # STATUS_SUCCESS
    return {k: (v.string_value if v.HasField("string_value") else v.number_value)
            for k, v in start.session_start_info.hparams.items()}


def _layout(events):
    from tensorboard.plugins.custom_scalar import layout_pb2

    proto = events.Tensors("custom_scalars__config__")[-1].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    return {category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
            for category in layout.category}


def test_hparams_live_in_the_run_beside_the_scalars_they_name(tmp_path: Path):
    out = tmp_path / "run"
    result = train_in_process(out, **{"model.widths": "[8,16,32]", "augment.cutout_p": 0.25,
                                      "augment.backend": "tensor", "train.epochs": 2,
                                      "train.log_every_steps": 2})
    runs = [p for p in (out / "tensorboard").rglob("*") if p.is_dir()]
    assert runs == [], "add_hparams's second run (tensorboard/hparams) must not come back"
    events = _events(out / "tensorboard")
    values = _hparams(events)
    assert values["model.name"] == "seed" and values["model.widths"] == "8,16,32"
    assert values["augment.cutout_p"] == pytest.approx(0.25) and values["augment.backend"] == "tensor"
    assert values["augment.hflip_p"] == pytest.approx(AugmentConfig.hflip_p)
    assert values["model.zero_init_residual"] == "false" and values["world_size"] == 1
    assert values["train.epochs"] == 2 and values["train.batch_size"] == 16
    # The metrics TensorBoard shows are the run's own scalars, their last values the run's results.
    scalars = set(events.Tags()["scalars"])
    assert {"test/accuracy", "test/loss", "train/accuracy", "train/loss"} <= scalars
    assert events.Scalars("test/accuracy")[-1].value == pytest.approx(result["test_accuracy"])
    assert events.Scalars("test/loss")[-1].value == pytest.approx(result["test_loss"])
    # The learning rate sits with the train/ scalars, per step and per epoch.
    assert "lr" not in scalars and "train/lr" in scalars
    assert not any(tag.startswith("hparam/") for tag in scalars)


def test_train_and_evaluation_curves_share_a_chart_on_the_split_evaluated(tmp_path: Path):
    # Both branches of the split's name: "test" here, "val" from a carve.
    for split in ("test", "val"):
        logger = MainLogger(tmp_path / split, progress_bar=False, eval_split=split)
        logger.start({"seed": 0}, {"world size": 1})
        row = {"global_step": 8, "lr": 0.1, "train/loss": 2.0, "train/accuracy": 0.25, "test/loss": 1.5,
               "test/accuracy": 0.375, "epoch_seconds": 1.0, "throughput/images_per_s": 100.0}
        logger.step(3, {"train/step_loss": 2.1, "lr": 0.05})   # the trainer's names, per sync step
        logger.epoch(1, 1, row)
        cfg = load_config(None, ["data.source=fake"])
        logger.finish(run_hparams(cfg, 1), {"test_accuracy": 0.375, "test_loss": 1.5})
        events = _events(tmp_path / split / "tensorboard")
        assert _layout(events) == {f"train vs {split}": {
            "loss": ["^train/loss$", f"^{split}/loss$"],
            "accuracy": ["^train/accuracy$", f"^{split}/accuracy$", f"^{split}/accuracy_tta$"]}}
        assert [(s.step, s.value) for s in events.Scalars(f"{split}/accuracy")] == [(8, 0.375)]
        assert [(s.step, s.value) for s in events.Scalars("train/lr")] == [(3, pytest.approx(0.05)),
                                                                           (8, pytest.approx(0.1))]
        assert "lr" not in events.Tags()["scalars"]
        assert _hparams(events)["model.name"] == "seed"


def _class_sorted(per_class: int, classes: int) -> DatasetArrays:
    """A folder-like training split: every image of class 0, then of class 1, ...; each
    image's pixels are its class number, so the preview tells which classes it holds."""
    labels = np.repeat(np.arange(classes), per_class)
    images = np.repeat(labels.astype(np.uint8)[:, None, None, None], 32 * 32 * 3, 1).reshape(-1, 32, 32, 3)
    stats = ChannelStats((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return DatasetArrays(ImageSplit(images, labels), ImageSplit(images[:1], labels[:1]),
                         tuple(f"class{k}" for k in range(classes)), stats)


@pytest.mark.parametrize("classes", [10, 3, 40])
def test_preview_indices_take_every_class_in_turn(classes: int):
    labels = np.repeat(np.arange(classes), 50)
    chosen = preview_indices(labels)
    assert len(chosen) == 32 and len(set(chosen.tolist())) == 32
    assert len(set(labels[chosen].tolist())) == min(32, classes)
    if classes == 10:   # 4 per class at most, the first row of 8 from 8 classes, spread over each class
        assert labels[chosen[:8]].tolist() == list(range(8))
        assert chosen[:10].tolist() == [50 * k for k in range(10)]
        assert chosen[10:20].tolist() == [50 * k + 16 for k in range(10)]


@pytest.mark.parametrize("backend", ["tensor", "albumentations"])
def test_augmented_preview_shows_every_class_of_a_class_sorted_split(backend: str):
    data = _class_sorted(per_class=60, classes=10)
    cfg = load_config(None, ["data.source=fake", f"augment.backend={backend}", "augment.hflip_p=0",
                             "augment.affine_p=0", "augment.cutout_p=0", "augment.crop_p=0"])
    preview = augmented_preview(data, cfg)
    assert preview.shape == (32, 3, 32, 32)
    # No augmentation drawn: each preview image is a normalized training image, whose pixel is its class.
    pixels = (preview.float() * 0.25 + 0.5) * 255
    classes_shown = pixels.round().flatten(1).mode(1).values.long()
    assert torch.allclose(pixels, classes_shown.view(-1, 1, 1, 1).float().expand_as(pixels), atol=1e-3)
    assert len(set(classes_shown.tolist())) == 10
    expected = normalize_batch(torch.from_numpy(data.train.images[preview_indices(data.train.labels)]), data.stats)
    assert torch.allclose(preview.float(), expected.float(), atol=1e-5)


class FakeClock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self) -> float:
        return next(self.times)


def test_progress_lines_give_images_per_second_and_the_whole_runs_eta():
    stream = io.StringIO()
    # Epoch 2 of 3, 10 steps of 64 images, 10 steps done before it; one step a second,
    # but the first step took 20 s (compilation): it is left out of the rate.
    lines = ProgressLines("epoch 2/3", total=10, images_per_step=64, run_step=10, run_steps=30,
                          every_seconds=5, clock=FakeClock([120] + [120 + k for k in range(1, 10)]),
                          stream=stream)
    assert list(lines.track(range(10))) == list(range(10))
    # Steps 1..10 end at 120, 121, ..., 129: lines at step 6 (125 - 120 >= 5); step 10's
    # would be the epoch's end, which the epoch's own line reports.
    assert stream.getvalue().splitlines() == ["epoch 2/3  step 6/10 (60%)  64 img/s  run ETA 0:00:14"]


def test_progress_lines_by_steps_after_a_resume_mid_epoch():
    stream = io.StringIO()
    # Resumed at step 4 of 20 (global step 24 of 60); 2 s a step; a line every 5 steps.
    lines = ProgressLines("epoch 2/3", total=20, initial=4, images_per_step=100, run_step=24, run_steps=60,
                          every_seconds=1e9, every_steps=5, clock=FakeClock([2.0 * k for k in range(16)]),
                          stream=stream)
    list(lines.track(range(16)))
    # Step 5 is the first (t=0); 50 img/s; at step 10: 60 - (24 - 4 + 10) = 30 steps left = 60 s.
    assert stream.getvalue().splitlines() == [
        "epoch 2/3  step 10/20 (50%)  50 img/s  run ETA 0:01:00",
        "epoch 2/3  step 15/20 (75%)  50 img/s  run ETA 0:00:50",
    ]


def test_a_log_without_a_terminal_gets_lines_not_a_bar(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    quiet = MainLogger(tmp_path / "quiet", progress_bar=False)
    assert quiet.progress(range(3), total=3, desc="x") == range(3)
    logger = MainLogger(tmp_path / "run", progress_bar=True)
    logger.PROGRESS_EVERY_SECONDS = 0.0
    assert list(logger.progress(iter(range(4)), total=5, desc="epoch 1/1", images_per_step=8,
                                run_steps=5)) == [0, 1, 2, 3]
    err = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[1] for line in err] == ["step 2/5 (40%)", "step 3/5 (60%)", "step 4/5 (80%)"]


def test_importing_the_trainer_does_not_load_matplotlib():
    done = subprocess.run([sys.executable, "-c", "import cifar_ddp.trainer, sys; print('matplotlib' in sys.modules)"],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# Runs tiny trainings one after another in one fresh interpreter and lists, after each,
# which of the optional modules it has imported so far.
_RUNS_AND_THEIR_IMPORTS = """
import json, sys
from cifar_ddp.config import load_config
from cifar_ddp.distributed import DistContext
from cifar_ddp.trainer import run
report = []
for overrides in json.loads(sys.argv[1]):
    result = run(load_config(None, overrides), DistContext())
    report.append({"final": {k: result[k] for k in ("test_accuracy", "test_loss", "train_accuracy", "replica_digests")},
                   "imported": [m for m in ("torch.utils.tensorboard", "matplotlib") if m in sys.modules]})
print(json.dumps(report))
"""


def _table_without_times(markdown: str) -> list:
    """training_log.md's epoch rows, less the time and images/s columns (all a rerun changes)."""
    rows = [line.split("|")[1:-3] for line in markdown.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows, markdown
    return rows


def test_tensorboard_and_figures_off_are_not_even_imported_and_change_no_number(tmp_path: Path):
    import json

    runs = {"neither": ("false", "false"), "tensorboard": ("true", "false"), "figures": ("false", "true")}
    overrides = [tiny_overrides(tmp_path / name, **{"model.widths": "[8,16,32]", "train.tensorboard": tb,
                                                    "train.figures": figures, "train.log_every_steps": 2})
                 for name, (tb, figures) in runs.items()]
    done = subprocess.run([sys.executable, "-c", _RUNS_AND_THEIR_IMPORTS, json.dumps(overrides)], cwd=REPO,
                          env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    neither, tensorboard, figures = json.loads(done.stdout.splitlines()[-1])
    # Each key's both branches: off is not imported at all, on is (in the order run).
    assert neither["imported"] == []
    assert tensorboard["imported"] == ["torch.utils.tensorboard"]
    assert figures["imported"] == ["torch.utils.tensorboard", "matplotlib"]
    present = {name: {p.name for p in (tmp_path / name).iterdir()} for name in runs}
    assert present["neither"] == {"checkpoints", "config.json", "training_log.md"}
    assert present["tensorboard"] == present["neither"] | {"tensorboard"}
    assert present["figures"] == present["neither"] | {"curves.png"}
    # With TensorBoard but no figures: the scalars and the augmented preview, no evaluation pictures.
    events = _events(tmp_path / "tensorboard" / "tensorboard")
    assert {"test/accuracy", "train/step_loss"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["train/augmented"]
    # The same run in every case (same seed): the same weights, metrics and log table.
    assert neither["final"] == tensorboard["final"] == figures["final"]
    tables = [_table_without_times((tmp_path / name / "training_log.md").read_text()) for name in runs]
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 2
    for name in runs:
        assert "## Where the wall time went" in (tmp_path / name / "training_log.md").read_text()


def test_figures_on_draw_the_evaluation_pictures_into_tensorboard(tmp_path: Path):
    train_in_process(tmp_path / "run", **{"model.widths": "[8,16,32]", "train.epochs": 1, "data.fake_size": 32})
    images = set(_events(tmp_path / "run" / "tensorboard").Tags()["images"])
    assert {"train/augmented", "test/confusion_matrix", "test/most_confident_mistakes"} <= images
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("tensorboard, figures, drawn", [("true", "true", True), ("true", "false", False),
                                                         ("false", "true", False)])
def test_the_trainer_draws_evaluation_figures_only_with_tensorboard_and_figures_on(tmp_path: Path, tensorboard,
                                                                                   figures, drawn):
    """Off, the trainer does not even ask for them: no probabilities pass, no mistakes kept."""
    from cifar_ddp.distributed import DistContext
    from cifar_ddp.loggers import RunLogger
    from cifar_ddp.trainer import run

    class Recorder(RunLogger):
        def __init__(self):
            self.figures_at = []

        def figures(self, global_step, *drawn_from) -> None:
            self.figures_at.append(global_step)

    recorder = Recorder()
    cfg = load_config(None, tiny_overrides(tmp_path, **{"model.widths": "[8,16,32]", "train.epochs": 1,
                                                        "data.fake_size": 32, "train.tensorboard": tensorboard,
                                                        "train.figures": figures}))
    run(cfg, DistContext(), logger=recorder)
    assert recorder.figures_at == ([32 // 16] if drawn else [])     # at the last epoch's end
