"""Faults: killed workers, preemption, interrupted saves, damaged checkpoints, NaN, bad input."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_ddp import checkpoint as ckpt
from cifar_ddp import lock
from cifar_ddp.errors import NonFiniteLoss
from cifar_ddp.errors import UserError
from cifar_ddp.errors import Preempted

from conftest import (JOB_TIMEOUT_S, REPO, assert_bitwise_equal, final_weights, job_env, make_image_folder,
                      run_job, tiny_overrides, torchrun, train_cmd, train_in_process)


@pytest.mark.slow
def test_sigkilled_worker_is_restarted_by_torchrun_and_resumes(tmp_path: Path):
    # 161 images over 2 ranks, batch 16: 5 steps per epoch. Rank 1 dies after step 8 (the
    # fault is injected at sync steps: every step here); the newest checkpoint is step 6.
    settings = {"data.fake_size": 161, "train.epochs": 3, "train.checkpoint_every_steps": 3,
                "train.keep_checkpoints": 5, "train.log_every_steps": 1}
    straight = run_job(torchrun(2, tiny_overrides(tmp_path / "straight", **settings)))
    assert straight.returncode == 0, straight.stderr[-3000:]

    env = job_env({"CIFAR_DDP_TEST_SIGKILL": "1:8"})
    restarted = run_job(torchrun(2, tiny_overrides(tmp_path / "killed", **settings), ["--max-restarts=1"]), env=env)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resumed from" in restarted.stdout and "step-00000006.pt" in restarted.stdout
    assert "SIGKILL" in restarted.stderr or "Signals.SIGKILL" in restarted.stderr or "-9" in restarted.stderr
    # Same world size, per-rank RNG states restored, deterministic gloo reductions: equal bit for bit.
    assert_bitwise_equal(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"))


def wait_for(path: Path, process: subprocess.Popen, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_checkpoints_exits_75_and_resumes_exactly(tmp_path: Path, signum):
    settings = {"data.fake_size": 512, "train.epochs": 4, "train.checkpoint_every_steps": 8}
    straight = run_job(train_cmd(*tiny_overrides(tmp_path / "straight", **settings)))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "stopped"
    process = subprocess.Popen(train_cmd(*tiny_overrides(out, **settings)), cwd=REPO, env=job_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ckpt.checkpoint_dir(out) / ckpt.step_file_name(1, 8), process)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 75, stderr[-3000:]
    assert "continue with train.resume=auto" in stdout
    stopped_at = ckpt.load_file(ckpt.checkpoint_dir(out) / "last.pt")["train_state"]["global_step"]
    assert 8 <= stopped_at < 128

    resumed = run_job(train_cmd("--resume", *tiny_overrides(out, **settings)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(final_weights(tmp_path / "straight"), final_weights(out))


SAVE_THEN_DIE = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from pathlib import Path
from cifar_ddp import checkpoint as ckpt
from cifar_ddp import lock
directory = Path({directory!r})
ckpt.save(directory, {{"value": torch.zeros(3)}}, 1, keep=2, is_best=False)
real_fsync = os.fsync
def die(fd):
    os._exit(9)   # the process is killed after writing the bytes, before the rename
os.fsync = die
ckpt.save(directory, {{"value": torch.ones(3)}}, 2, keep=2, is_best=False)
"""


def test_save_killed_mid_write_leaves_previous_checkpoint_loadable(tmp_path: Path):
    directory = tmp_path / "checkpoints"
    done = subprocess.run([sys.executable, "-c", SAVE_THEN_DIE.format(repo=str(REPO), directory=str(directory))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 9
    assert list(directory.glob(".*.tmp")), "the killed save left its temporary file"
    assert torch.equal(ckpt.load_file(directory / "last.pt", expect=())["value"], torch.zeros(3))
    assert [step for step, _ in ckpt.step_files(directory)] == [1]
    # The next save clears the leftover.
    ckpt.save(directory, {"value": torch.full((3,), 2.0)}, 3, keep=2, is_best=False)
    assert not list(directory.glob(".*.tmp"))


@pytest.mark.parametrize("damaged, expected", [
    # The newest step file is truncated but last.pt holds the same step intact: use it.
    (["save-000002-step-00000012.pt"], ("last.pt", 12)),
    # Everything at step 12 is damaged (best.pt too, whichever step it holds): step 6 is left.
    (["save-000002-step-00000012.pt", "last.pt", "best.pt"], ("save-000001-step-00000006.pt", 6)),
])
def test_resume_takes_the_newest_intact_checkpoint_with_warning(tmp_path: Path, damaged, expected, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(Preempted):
        train_in_process(out, **{"train.epochs": 3, "train.stop_after_steps": 12, "train.keep_checkpoints": 3})
    directory = ckpt.checkpoint_dir(out)
    assert [s for s, _ in ckpt.step_files(directory)] == [12, 6]
    for name in damaged:
        path = directory / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_file(directory / damaged[0])
    name, step = expected
    found = ckpt.find_resumable(directory)
    assert found is not None and found[0].name == name and found[1]["train_state"]["global_step"] == step
    # The run that wrote them was killed between renames: its pending checksums are left.
    for name_ in damaged:
        (directory / f".{name_}.sha256.killed.tmp").write_text("0" * 64)

    waits = []   # on a dead save's leftovers the resume would wait out the grace for each file
    monkeypatch.setattr(ckpt, "_wait_for_writer", lambda: waits.append(1))
    with pytest.warns(UserWarning, match=f"step-00000012.pt.*resuming from .*{name}"):
        result = train_in_process(out, **{"train.epochs": 3, "train.resume": "auto", "train.keep_checkpoints": 3})
    assert result["global_step"] == 18 and result["epochs"] == 3
    assert not waits, "the resume waited for a writer that is gone instead of clearing its leftovers"


def test_warnings_on_the_console_are_one_line(tmp_path: Path):
    out = tmp_path / "run"
    assert run_job(train_cmd(*tiny_overrides(out, **{"train.epochs": 1}))).returncode == 0
    step_file = ckpt.step_files(ckpt.checkpoint_dir(out))[0][1]
    step_file.write_bytes(step_file.read_bytes()[:100])
    done = run_job(train_cmd("--resume", *tiny_overrides(out, **{"train.epochs": 2})))
    assert done.returncode == 0, done.stderr[-2000:]
    warning = [line for line in done.stderr.splitlines() if "cannot be used" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: checkpoint(s) cannot be used")
    assert "warnings.warn" not in done.stderr and "UserWarning" not in done.stderr


def test_explicit_damaged_checkpoint_is_refused_with_message(tmp_path: Path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    done = run_job(train_cmd(*tiny_overrides(tmp_path / "run", **{"train.resume": str(bad)})))
    assert done.returncode == 2 and "is not a cifar_ddp checkpoint" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def nan_at_step_3(monkeypatch):
    import cifar_ddp.engine as engine

    real = engine.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(engine.F, "cross_entropy", poisoned)


def test_nan_loss_stops_with_step_and_advice(tmp_path: Path, nan_at_step_3):
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 3 .*no checkpoint was written before it"):
        train_in_process(tmp_path / "run")


def test_nan_loss_is_skipped_when_asked(tmp_path: Path, nan_at_step_3):
    result = train_in_process(tmp_path / "run", **{"train.on_nonfinite": "skip"})
    state = ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "run") / "last.pt")["train_state"]
    assert state["skipped_steps"] == 1 and result["epochs"] == 2
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values() if t.is_floating_point())


@pytest.mark.parametrize("overrides, message", [
    (["data.source=folder", "data.root=/no/such/dir"], "data.root '/no/such/dir' does not exist"),
    (["train.epochs=0"], "train.epochs is 0"),
    (["train.batch_size=500"], "larger than the 96 training images"),
    (["train.precision=fp16"], "fp16 needs a CUDA GPU"),
    (["train.cuda_graph=true"], "cuda_graph=true needs a CUDA GPU"),
])
def test_bad_input_stops_before_any_output(tmp_path: Path, overrides, message):
    out = tmp_path / "run"
    argv = tiny_overrides(out)
    done = run_job(train_cmd(*argv, *overrides))
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists(), "a failed start must not leave an output folder that looks like a result"


@pytest.mark.parametrize("where, message", [
    ("a_file", "is a file, not a folder"),
    ("a_file/below", "is a file, not a folder"),
    ("/proc/cifar_ddp_run", "cannot be written"),
])
def test_unwritable_out_dir_stops_before_loading_data(tmp_path: Path, where, message):
    (tmp_path / "a_file").write_text("not a folder")
    out = Path(where) if where.startswith("/") else tmp_path / where
    done = run_job(train_cmd(*tiny_overrides(out), "data.source=folder", f"data.root={tmp_path / 'no_data'}"))
    # The folder is refused first: the missing data would otherwise be the complaint.
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert "data.root" not in done.stderr


def test_flags_may_stand_among_the_overrides(tmp_path: Path):
    out = tmp_path / "run"
    first = run_job(train_cmd(*tiny_overrides(out, **{"train.epochs": 1})))
    assert first.returncode == 0, first.stderr[-2000:]
    args = tiny_overrides(out, **{"train.epochs": 2})
    done = run_job(train_cmd(*args[:2], "--resume", *args[2:]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout


def test_explicit_resume_with_nothing_to_resume_stops_but_auto_starts_fresh(tmp_path: Path):
    out = tmp_path / "misspelt_run"
    done = run_job(train_cmd("--resume", *tiny_overrides(out, **{"train.epochs": 1})))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--resume found no checkpoint" in done.stderr and str(out) in done.stderr
    assert not out.exists()
    fresh = run_job(train_cmd(*tiny_overrides(out, **{"train.epochs": 1, "train.resume": "auto"})))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "train.resume=auto: no checkpoint" in fresh.stdout and "starting fresh" in fresh.stdout


def test_corrupt_image_stops_naming_the_file(tmp_path: Path):
    root = make_image_folder(tmp_path / "images")
    bad = root / "train" / "frog" / "0001.png"
    bad.write_bytes(b"\x89PNG garbage")
    done = run_job(train_cmd(*tiny_overrides(tmp_path / "run"), "data.source=folder", f"data.root={root}"))
    assert done.returncode == 2 and "0001.png" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_disk_full_during_a_save_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    import errno

    from cifar_ddp import files

    out = tmp_path / "run"
    real = files.atomic_write
    calls = {"n": 0}

    def full_after_first_save(path, data):
        calls["n"] += path.suffix == ".pt"
        if path.suffix == ".pt" and calls["n"] > 3:   # step file, last.pt, best.pt of epoch 1 succeed
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write", full_after_first_save)
    with pytest.raises(UserError, match=r"cannot write a checkpoint in .*No space left on device.*free space") as info:
        train_in_process(out, **{"train.epochs": 2})
    assert "step-00000006.pt" in str(info.value)
    # The real size of a checkpoint file, not a rounded-up guess.
    size = (ckpt.checkpoint_dir(out) / "last.pt").stat().st_size / 2**20
    assert f"each checkpoint file takes {size:.1f} MB" in str(info.value)
    assert ckpt.load_file(ckpt.checkpoint_dir(out) / "last.pt")["train_state"]["global_step"] == 6
    assert not list(ckpt.checkpoint_dir(out).glob(".*.tmp"))


SIGTERM_DURING_TEARDOWN = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from cifar_ddp import launcher
from cifar_ddp.config import load_config
from cifar_ddp.errors import Preempted

def teardown(ctx):   # torchrun's SIGTERM reaches this rank while it leaves the group
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)

def work(cfg, loaded, ctx):
    raise Preempted()   # stopped after writing its checkpoint

launcher.shutdown = teardown
sys.exit(launcher._launch(lambda: (load_config(None, ["data.source=fake"]), None), work))
"""


def test_a_preempted_rank_stopped_during_teardown_still_exits_resumable():
    """After the checkpoint is written, torchrun SIGTERMs the ranks still tearing down as
    soon as one exits 75: they must say 75 ("resumable") too, not die of the signal."""
    done = subprocess.run([sys.executable, "-c", SIGTERM_DURING_TEARDOWN.format(repo=str(REPO))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 75, (done.returncode, done.stderr[-2000:])


@pytest.mark.slow
def test_the_resume_after_a_larger_global_batch_is_the_one_the_next_resume_takes(tmp_path: Path):
    """Step numbers are not comparable across global batches: epoch 3 under two ranks ends
    at step 9, before the one-process run's step 12. The save number orders them."""
    out = tmp_path / "run"
    train_in_process(out, **{"train.epochs": 2})          # 96 images, batch 16: 6 steps per epoch
    directory = ckpt.checkpoint_dir(out)
    # As an earlier version left it: step-<step>.pt names, no save numbers (still read).
    payload = ckpt.load_file(directory / "last.pt")
    del payload["save_number"]
    for path in directory.iterdir():
        path.unlink()
    ckpt.write_file(directory / "step-00000012.pt", ckpt.encode(payload))
    ckpt.write_file(directory / "last.pt", ckpt.encode(payload))

    wider = run_job(torchrun(2, tiny_overrides(out, **{"train.epochs": 3, "train.resume": "auto"})))
    assert wider.returncode == 0, wider.stderr[-3000:]
    assert f"resumed from {directory / 'step-00000012.pt'} at epoch 3, step 0" in wider.stdout
    # Global batch 32: 3 steps per epoch, epoch 3 ends at step 9, saved as the folder's first numbered save.
    assert [p.name for _, p in ckpt.step_files(directory)] == ["save-000001-step-00000009.pt", "step-00000012.pt"]
    found = ckpt.find_resumable(directory)
    assert found is not None and found[0].name == "save-000001-step-00000009.pt"
    assert found[1]["train_state"]["epoch"] == 3 and found[1]["save_number"] == 1

    result = train_in_process(out, **{"train.epochs": 4, "train.resume": "auto"})
    assert result["epochs"] == 4 and result["global_step"] == 24   # epoch 4 at 6 steps: 18 + 6
    final = ckpt.load_file(directory / "last.pt")
    assert [row["epoch"] for row in final["train_state"]["history"]] == [1, 2, 3, 4]
    assert final["save_number"] == 2


def test_a_running_training_holds_its_out_dir_against_a_second_run_a_report_and_a_plot(tmp_path: Path):
    out = tmp_path / "run"
    # Far longer than the test: it is killed once the others have tried.
    settings = {"data.fake_size": 4096, "train.epochs": 50, "train.checkpoint_every_steps": 2,
                "train.log_every_steps": 2}
    first = subprocess.Popen(train_cmd(*tiny_overrides(out, **settings)), cwd=REPO, env=job_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        step_file = ckpt.checkpoint_dir(out) / ckpt.step_file_name(1, 2)
        wait_for(step_file, first)
        others = {
            "out_dir": train_cmd(*tiny_overrides(out, **settings, **{"train.resume": "auto"})),
            "--report": [sys.executable, str(REPO / "launch" / "evaluate.py"), "--checkpoint",
                         str(step_file.with_name("last.pt")),   # replaced atomically; step files are pruned
                         "--report", str(out / "report")],
            "--out folder": [sys.executable, str(REPO / "launch" / "lr_find.py"), "--config", "configs/smoke.yaml",
                             "--steps", "10", "--out", str(out / "lr.png"), *tiny_overrides(tmp_path / "other")],
        }
        started = {what: subprocess.Popen(argv, cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True) for what, argv in others.items()}
        # A refusal takes an interpreter's start-up; a run that is let in would take minutes.
        done = {what: process.communicate(timeout=120)[1] for what, process in started.items()}
        done = {what: (started[what].returncode, stderr) for what, stderr in done.items()}
        assert first.poll() is None, "the first run ended before the others tried"
    finally:
        for process in [first, *locals().get("started", {}).values()]:
            process.kill()
            process.wait(timeout=JOB_TIMEOUT_S)
    holder = f"pid {first.pid} on host {socket.gethostname()}"
    for what, (code, stderr) in done.items():
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, (what, stderr[-2000:])
        assert errors[0].startswith(f"error: {what} '{out}") and holder in errors[0], errors[0]
        assert "a training run that is running now" in errors[0]
    assert not (out / "report").exists() and not (out / "lr.png").exists()
    assert len(list((out / "tensorboard").glob("events.*"))) == 1     # the second run wrote nothing
    # SIGKILLed, the first run left its holder note, but the kernel dropped the lock itself.
    assert (out / lock.HOLDER_FILE).is_file()
    lock.hold(out).release()
    assert not (out / lock.HOLDER_FILE).exists() and (out / "config.json").is_file()


def test_a_failed_start_leaves_no_folder_and_no_lock(tmp_path: Path):
    out = tmp_path / "deep" / "run"
    with pytest.raises(UserError, match="does not exist"):
        train_in_process(out, **{"data.source": "folder", "data.root": str(tmp_path / "no_data")})
    assert not (tmp_path / "deep").exists()


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_and_the_message_names_the_signal_and_the_rank(tmp_path: Path):
    out = tmp_path / "run"
    # 96 images over 2 ranks, batch 16: 3 steps per epoch; rank 1 alone gets SIGTERM after step 4.
    settings = {"train.epochs": 3, "train.log_every_steps": 1}
    done = run_job(torchrun(2, tiny_overrides(out, **settings)), env=job_env({"CIFAR_DDP_TEST_SIGNAL": "1:4:SIGTERM"}))
    assert "stopped by SIGTERM, sent to rank 1 (the others stopped with it) at step 4" in done.stdout, \
        done.stdout[-2000:] + done.stderr[-2000:]
    assert "stop_after_steps" not in done.stdout
    assert ckpt.load_file(ckpt.checkpoint_dir(out) / "last.pt")["train_state"]["global_step"] == 4


def test_a_disk_too_full_for_the_checkpoints_stops_at_start_naming_the_folder_and_leaves_nothing(tmp_path: Path,
                                                                                                 monkeypatch):
    import shutil
    from collections import namedtuple

    train_in_process(tmp_path / "real", **{"train.epochs": 1})
    real_size = (ckpt.checkpoint_dir(tmp_path / "real") / "last.pt").stat().st_size / 2**20
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    out = tmp_path / "deep" / "run"
    with pytest.raises(UserError, match=rf"out_dir '{out}' has 1.0 MB free; this run's first checkpoints need "
                                        r"about [\d.]+ MB \(([\d.]+) MB each") as info:
        train_in_process(out)
    estimate = float(str(info.value).split("MB (")[1].split(" MB each")[0])
    assert abs(estimate - real_size) <= 0.1, (estimate, real_size)
    assert not (tmp_path / "deep").exists()


def test_a_full_disk_at_the_folder_check_is_one_line_naming_the_folder(tmp_path: Path, monkeypatch):
    import errno
    import os

    from cifar_ddp.files import check_writable_folder

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=rf"out_dir '{tmp_path / 'run'}' cannot be written \(No space left on device "
                                        rf"in '{tmp_path}'\); free space there or pick another out_dir$"):
        check_writable_folder(tmp_path / "run", "out_dir")
    assert list(tmp_path.iterdir()) == []
