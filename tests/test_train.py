"""Single-process training: a run end to end, exact resume, logs, evaluation CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_ddp import checkpoint as ckpt
from cifar_ddp.config import CIFAR10_CLASSES, config_from_dict
from cifar_ddp.distributed import DistContext
from cifar_ddp.evaluation import evaluate_checkpoint
from cifar_ddp.errors import UserError
from cifar_ddp.errors import Preempted

from conftest import (REPO, assert_bitwise_equal, final_weights, make_image_folder, run_job, tiny_overrides,
                      train_cmd, train_in_process)


def test_run_writes_checkpoints_logs_and_tensorboard(tmp_path: Path):
    result = train_in_process(tmp_path / "run", **{"train.epochs": 3})
    assert result["epochs"] == 3 and result["evaluated_on"] == "test"
    directory = ckpt.checkpoint_dir(tmp_path / "run")
    assert {"last.pt", "best.pt"} <= {p.name for p in directory.iterdir()}
    assert len(ckpt.step_files(directory)) == 2  # keep_checkpoints=2 prunes the oldest
    payload = ckpt.load_file(directory / "last.pt")
    # The reported accuracy is that of the saved weights, re-evaluated from the file.
    again = evaluate_checkpoint(payload, config_from_dict(payload["config"]), DistContext())
    assert again["images"] == 96 and again["correct"] == round(result["test_accuracy"] * 96)
    assert payload["train_state"]["epoch"] == 3 and payload["config"]["train"]["epochs"] == 3
    log = (tmp_path / "run" / "training_log.md").read_text()
    assert log.count("\n| 1 |") == 1 and log.count("\n| 3 |") == 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "test/loss", "test/accuracy", "train/lr",
            "throughput/images_per_s"} <= scalars
    assert len(events.Scalars("test/accuracy")) == 3
    # The pictures of the last evaluation: confusion matrix, mistakes, a PR curve per class.
    assert {"train/augmented", "test/confusion_matrix", "test/most_confident_mistakes"} <= set(events.Tags()["images"])
    assert {f"test/pr_curve/class{k}" for k in range(10)} <= set(events.Tags()["tensors"])
    # The hparams live in the run itself (tests/test_loggers.py), not in a second run.
    assert not (tmp_path / "run" / "tensorboard" / "hparams").exists()
    from PIL import Image
    with Image.open(tmp_path / "run" / "curves.png") as curves:   # for people without TensorBoard
        assert curves.format == "PNG" and curves.size[0] > curves.size[1] > 200


def test_validation_run_is_labelled_val_not_test(tmp_path: Path, capsys):
    result = train_in_process(tmp_path / "run", **{"data.val_size": 32, "train.epochs": 1})
    assert result["evaluated_on"] == "val"
    out = capsys.readouterr().out
    assert "val images: 32" in out and "val loss" in out and "test loss" not in out
    log = (tmp_path / "run" / "training_log.md").read_text()
    assert "| val acc |" in log and "- final val_accuracy:" in log and "test" not in log

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert "val/accuracy" in scalars and not any(tag.startswith("test/") for tag in scalars)


@pytest.mark.parametrize("stop_step, extra", [
    (12, {}),                                       # at an epoch boundary (6 steps/epoch)
    (8, {"train.checkpoint_every_steps": 4}),       # inside epoch 2
])
def test_interrupted_and_resumed_run_is_bitwise_equal(tmp_path: Path, stop_step, extra):
    settings = {"train.epochs": 3, "data.fake_size": 96, "train.batch_size": 16, **extra}
    train_in_process(tmp_path / "straight", **settings)
    with pytest.raises(Preempted):
        train_in_process(tmp_path / "split", **settings, **{"train.stop_after_steps": stop_step})
    stopped = ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "split") / "last.pt")
    assert stopped["train_state"]["global_step"] == stop_step
    result = train_in_process(tmp_path / "split", **settings, **{"train.resume": "auto"})
    assert result["global_step"] == 18
    assert_bitwise_equal(final_weights(tmp_path / "straight"), final_weights(tmp_path / "split"))
    # Each epoch's training figures cover the whole epoch, also the one split by the stop.
    histories = [ckpt.load_file(ckpt.checkpoint_dir(tmp_path / run) / "last.pt")["train_state"]["history"]
                 for run in ("straight", "split")]
    for straight, split in zip(*histories):
        assert (split["train/loss"], split["train/accuracy"]) == (straight["train/loss"], straight["train/accuracy"])


def test_resume_with_ema_and_plain_last_epoch(tmp_path: Path):
    settings = {"train.epochs": 3, "train.ema_decay": 0.9, "augment.plain_last_epochs": 1}
    train_in_process(tmp_path / "a", **settings)
    with pytest.raises(Preempted):
        train_in_process(tmp_path / "b", **settings, **{"train.stop_after_steps": 6})
    train_in_process(tmp_path / "b", **settings, **{"train.resume": "auto"})
    a = ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "a") / "last.pt")
    b = ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "b") / "last.pt")
    assert_bitwise_equal(a["model"], b["model"])
    assert_bitwise_equal(a["ema"], b["ema"])


def test_epoch_logged_but_not_checkpointed_appears_once_after_resume(tmp_path: Path):
    # The state a crash between writing epoch 3's log row and its checkpoint leaves:
    # resuming from epoch 2's checkpoint trains epoch 3 again.
    train_in_process(tmp_path / "run", **{"train.epochs": 3})
    log_path = tmp_path / "run" / "training_log.md"
    first = log_path.read_text()
    epoch_2 = ckpt.step_files(ckpt.checkpoint_dir(tmp_path / "run"))[1][1]
    assert ckpt.load_file(epoch_2)["train_state"]["epoch"] == 2
    train_in_process(tmp_path / "run", **{"train.epochs": 3, "train.resume": str(epoch_2)})
    log = log_path.read_text()
    rows = [line.split("|")[1].strip() for line in log.splitlines() if line.startswith("| ") and "epoch" not in line]
    assert rows == ["1", "2", "3"]
    assert log.count("- final test_accuracy") == 1
    # The rows of epochs that were not re-run are kept as they were.
    assert [line for line in log.splitlines() if line.startswith(("| 1 |", "| 2 |"))] == \
        [line for line in first.splitlines() if line.startswith(("| 1 |", "| 2 |"))]


def test_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path: Path):
    train_in_process(tmp_path / "run", **{"train.epochs": 1})
    before = {p.name: p.read_bytes() for p in ckpt.checkpoint_dir(tmp_path / "run").iterdir()}
    with pytest.raises(UserError, match=r"already holds checkpoints.*--resume.*another out_dir"):
        train_in_process(tmp_path / "run", **{"train.epochs": 1})
    after = {p.name: p.read_bytes() for p in ckpt.checkpoint_dir(tmp_path / "run").iterdir()}
    assert before == after


def test_evaluate_cli_matches_training_and_reads_test_only_folder(tmp_path: Path):
    root = make_image_folder(tmp_path / "images", per_class=4)
    out = tmp_path / "run"
    result = train_in_process(out, **{"data.source": "folder", "data.root": str(root), "train.batch_size": 8})
    checkpoint = ckpt.checkpoint_dir(out) / "last.pt"
    done = run_job([sys.executable, str(REPO / "launch" / "evaluate.py"), "--checkpoint", str(checkpoint), "--json"])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-9)
    assert report["images"] == 40 and set(report["per_class_accuracy"]) >= {"cat", "truck"}
    # A folder with only a test/ tree is enough: the statistics travel in the checkpoint.
    test_only = make_image_folder(tmp_path / "only_test", per_class=2, splits=("test",), seed=5)
    done = run_job([sys.executable, str(REPO / "launch" / "evaluate.py"), "--checkpoint", str(checkpoint),
                    f"data.root={test_only}"])
    assert done.returncode == 0, done.stderr
    assert "test images: 20" in done.stdout and "accuracy  precision  recall" in done.stdout
    assert sum(line.split()[0] in CIFAR10_CLASSES for line in done.stdout.splitlines() if line.strip()) == 10


def test_evaluate_output_into_a_closed_pipe_and_a_folder_as_checkpoint(tmp_path: Path):
    train_in_process(tmp_path / "run", **{"train.epochs": 1})
    directory = ckpt.checkpoint_dir(tmp_path / "run")
    script = f"{sys.executable} {REPO / 'launch' / 'evaluate.py'} --checkpoint {directory / 'last.pt'} | true"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert "BrokenPipeError" not in done.stderr and "Traceback" not in done.stderr
    folder = run_job([sys.executable, str(REPO / "launch" / "evaluate.py"), "--checkpoint", str(directory)])
    assert folder.returncode == 2 and "is a folder; pass a .pt file in it" in folder.stderr


def test_written_files_follow_the_umask(tmp_path: Path):
    train_in_process(tmp_path / "run", **{"train.epochs": 1})
    mask = os.umask(0)
    os.umask(mask)
    for path in (ckpt.checkpoint_dir(tmp_path / "run") / "last.pt", tmp_path / "run" / "training_log.md",
                 tmp_path / "run" / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_evaluate_refuses_checkpoint_of_another_architecture(tmp_path: Path):
    train_in_process(tmp_path / "run", **{"train.epochs": 1})
    done = run_job([sys.executable, str(REPO / "launch" / "evaluate.py"), "--checkpoint",
                    str(ckpt.checkpoint_dir(tmp_path / "run") / "last.pt"), "model.widths=[8,16,32]"])
    assert done.returncode == 2
    assert "different architecture" in done.stderr and "Traceback" not in done.stderr
    # It names the file, and its advice fits evaluation (nothing about resuming).
    assert "last.pt' was saved" in done.stderr and "drop the model.* overrides" in done.stderr
    assert "train.resume" not in done.stderr


def test_batch_larger_than_split_is_refused_before_training(tmp_path: Path):
    with pytest.raises(UserError, match="larger than the 96 training images"):
        train_in_process(tmp_path / "run", **{"train.batch_size": 200})
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_more_ranks_than_a_batch_of_images_each_is_refused(tmp_path: Path):
    # 5 images over 3 ranks: the sampler would pad each shard to 2, so a rank's batch of 2
    # would be partly a repeated image. (Collectives are no-ops without a process group.)
    from cifar_ddp.config import load_config
    from cifar_ddp.trainer import run

    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"data.fake_size": 5, "train.batch_size": 2}))
    with pytest.raises(UserError, match=r"batch_size=2 is larger than the 1 training images each of the 3 "
                                        r"process\(es\) gets \(5 in all\)"):
        run(cfg, DistContext(world_size=3))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, message", [
    ("data.root", "data.root '{file}' is a file, not a folder; point it at the folder that holds train/ and test/"),
    ("train.resume", "train.resume='{folder}' is a folder; pass a checkpoint file in it, e.g. "
                     "train.resume={folder}/last.pt"),
])
def test_a_file_or_folder_in_the_wrong_place_is_named_for_what_it_is(tmp_path: Path, setting, message):
    (tmp_path / "a_file").write_text("")
    value = tmp_path / ("a_file" if setting == "data.root" else "")
    extra = {"data.source": "folder"} if setting == "data.root" else {}
    with pytest.raises(UserError) as info:
        train_in_process(tmp_path / "run", **extra, **{setting: str(value).rstrip("/")})
    assert str(info.value).startswith(message.format(file=value, folder=str(tmp_path)))


def test_cli_reports_bad_override_without_traceback(tmp_path: Path):
    done = run_job(train_cmd("--config", "configs/smoke.yaml", "train.epoch=3", f"out_dir={tmp_path}"))
    assert done.returncode == 2
    assert "unknown config key 'train.epoch'" in done.stderr and "Traceback" not in done.stderr


def test_ema_decay_warms_up_then_holds():
    from cifar_ddp.ema import WeightEma

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    # (1 + n) / (10 + n) passes 0.9 at n = 80: the 199 updates cover the warm-up and the cap.
    ema = WeightEma(model, 0.9)
    expected = {"weight": None, "running_mean": None}
    for n in range(1, 200):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model(torch.randn(4, 2) + n)      # a train-mode forward moves BN's statistics and counter
        ema.update(model)
        # The first update copies; update n >= 1 keeps min(decay, (1+n)/(10+n)) of the average.
        keep = min(0.9, (1 + (n - 1)) / (10 + (n - 1))) if n > 1 else 0.0
        for key, current in (("weight", model[0].weight), ("running_mean", model[1].running_mean)):
            current = current.detach().double()
            expected[key] = current.clone() if n == 1 else keep * expected[key] + (1 - keep) * current
        # Checked at every update (a float64 reference), so an error in the first ones cannot fade.
        torch.testing.assert_close(ema.module[0].weight.double(), expected["weight"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ema.module[1].running_mean.double(), expected["running_mean"], rtol=1e-5, atol=1e-5)
        assert int(ema.module[1].num_batches_tracked) == n == int(model[1].num_batches_tracked)
    # Early on the average stays close to the current weights instead of the initial ones.
    assert (model[0].weight - ema.module[0].weight).abs().max() < 25


def test_evaluate_refuses_a_negative_gallery(tmp_path: Path, capsys):
    from cifar_ddp.launcher import run_evaluation

    code = run_evaluation(str(tmp_path / "any.pt"), [], False, False, report_dir=str(tmp_path / "report"), gallery=-1)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and errors == ["error: --gallery is -1; it is how many mistakes the report shows, 0 or more"]
    assert list(tmp_path.iterdir()) == []
