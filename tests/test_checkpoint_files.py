"""Checkpoint files are plain torch.save files, loaded with weights_only=True, with a
SHA-256 beside each: readable by any PyTorch tool, refused when they could run code,
caught when damaged even at the same length."""

import hashlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cifar_ddp import checkpoint as ckpt
from cifar_ddp.models import build_model

from conftest import REPO, job_env, train_in_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train_in_process(out, **{"train.epochs": 2, "train.ema_decay": 0.9})
    return ckpt.checkpoint_dir(out)


def test_every_checkpoint_is_a_plain_torch_file_with_its_checksum(trained: Path):
    files = sorted(trained.glob("*.pt"))
    assert {p.name for p in files} >= {"last.pt", "best.pt", "save-000002-step-00000012.pt"}
    for path in files:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        digest, name = ckpt.checksum_path(path).read_text().split()
        assert name == path.name and digest == hashlib.sha256(path.read_bytes()).hexdigest()
        # What a user does with it, outside the trainer.
        model = build_model(payload["config"])
        model.load_state_dict(payload["model"])
        assert torch.equal(model.state_dict()["c1.0.0.weight"], payload["model"]["c1.0.0.weight"])


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(path: Path, marker: Path, old_header: bool) -> Path:
    buffer = io.BytesIO()
    torch.save({"model": {}, "config": RunsCode(marker)}, buffer)
    body = buffer.getvalue()
    if old_header:   # the format of earlier versions: right header, right checksum
        path.write_bytes(b"CIFARDDP1\n" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    else:
        ckpt.write_file(path, body)
    return path


@pytest.mark.parametrize("old_header", [False, True])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path, old_header: bool):
    marker = tmp_path / "ran"
    bad = crafted(tmp_path / "downloaded.pt", marker, old_header)
    done = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--checkpoint", str(bad)],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert not marker.exists(), "the crafted pickle ran its command"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr
    assert "holds Python objects other than tensors" in errors[0] and "was not loaded" in errors[0]


def test_a_byte_changed_in_place_is_caught_and_resume_falls_back(tmp_path: Path):
    out = tmp_path / "run"
    train_in_process(out, **{"train.epochs": 2, "train.keep_checkpoints": 2})
    directory = ckpt.checkpoint_dir(out)
    for name in ("last.pt", "best.pt", "save-000002-step-00000012.pt"):
        path = directory / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01       # one bit, inside the tensors' bytes, same length
        path.write_bytes(bytes(data))
        with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt.*SHA-256 differs"):
            ckpt.load_file(path)
    with pytest.warns(UserWarning, match="cannot be used"):
        found = ckpt.find_resumable(directory)
    assert found is not None and found[0].name == "save-000001-step-00000006.pt"


def test_old_format_is_read_with_a_note_and_upgraded_to_a_plain_file(trained: Path, tmp_path: Path):
    body = (trained / "last.pt").read_bytes()
    old = tmp_path / "old.pt"
    old.write_bytes(b"CIFARDDP1\n" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    with pytest.warns(UserWarning, match="earlier checkpoint format.*upgrade"):
        assert ckpt.load_file(old)["train_state"]["global_step"] == 12
    done = subprocess.run([sys.executable, "-m", "cifar_ddp.checkpoint", "upgrade", str(old)], cwd=REPO,
                          env=job_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert old.read_bytes() == body and ckpt.checksum_path(old).is_file()
    assert torch.load(old, map_location="cpu", weights_only=True)["train_state"]["global_step"] == 12


def test_a_file_without_its_checksum_loads_with_a_warning(trained: Path, tmp_path: Path):
    lone = tmp_path / "lone.pt"
    lone.write_bytes((trained / "last.pt").read_bytes())
    with pytest.warns(UserWarning, match="no lone.pt.sha256 beside it"):
        assert "model" in ckpt.load_file(lone)


def tiny_payload(step: int, tag: str) -> dict:
    return {"model": {"w": torch.zeros(1)}, "config": {}, "train_state": {"global_step": step}, "tag": tag}


def test_on_a_tie_in_steps_the_step_file_is_chosen_over_last_pt(tmp_path: Path):
    """The same save is both step-N.pt and last.pt; the step file (listed first) is the one
    named when resuming, and a later save wins over both."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    ckpt.save(directory, tiny_payload(4, "a"), global_step=4, keep=3, is_best=True)
    path, payload = ckpt.find_resumable(directory)
    assert path.name == ckpt.step_file_name(1, 4) and payload["tag"] == "a"
    ckpt.save(directory, tiny_payload(6, "b"), global_step=6, keep=3, is_best=False)
    path, payload = ckpt.find_resumable(directory)
    assert path.name == ckpt.step_file_name(2, 6) and payload["tag"] == "b"


def test_fallback_goes_by_step_through_last_and_best_then_older_step_files(tmp_path: Path):
    """Saves at steps 4, 6 and 8 of the same epoch (mid-epoch checkpoints), keep=2, step 8 the
    best: the step files left are 8 and 6. Damage, one after the other, step-8, last.pt and
    best.pt: each time the newest intact step is chosen, best.pt included."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for step in (4, 6, 8):
        payload = tiny_payload(step, f"s{step}")
        payload["train_state"]["epoch"] = 1
        ckpt.save(directory, payload, global_step=step, keep=2, is_best=step == 8)
    assert [s for s, _ in ckpt.step_files(directory)] == [8, 6]
    expected = [(ckpt.step_file_name(3, 8), 8), ("last.pt", 8), ("best.pt", 8), (ckpt.step_file_name(2, 6), 6)]
    for damaged, (name, step) in zip([None, ckpt.step_file_name(3, 8), "last.pt", "best.pt"], expected):
        if damaged:
            (directory / damaged).write_bytes(b"PK\x03\x04 damaged")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # "cannot be used": what the test does on purpose
            path, payload = ckpt.find_resumable(directory)
        assert (path.name, payload["train_state"]["global_step"]) == (name, step), damaged


def test_a_background_save_writes_the_state_as_it_was_when_submitted(tmp_path: Path):
    """Training changes the tensors in place right after a save is submitted: the file holds
    the values of the moment of the save, and a failure is raised by the next wait."""
    directory = tmp_path / "checkpoints"
    weights = torch.arange(1_000_000, dtype=torch.float32)
    saver = ckpt.BackgroundSaver()
    saver.submit(directory, {"model": {"w": weights}, "config": {}}, global_step=3, keep=2, is_best=True,
                 save_number=1)
    weights.add_(1.0)                      # the next training step, while the file is written
    saver.wait()
    assert saver.last_written == directory / ckpt.step_file_name(1, 3)
    for name in (ckpt.step_file_name(1, 3), "last.pt", "best.pt"):
        saved = ckpt.load_file(directory / name)
        assert torch.equal(saved["model"]["w"], torch.arange(1_000_000, dtype=torch.float32)), name
        assert saved["save_number"] == 1
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    saver.submit(blocked / "checkpoints", {"model": {}, "config": {}}, 5, 2, False, 3)
    with pytest.raises(ckpt.SaveFailed) as failed:
        saver.wait()
    assert isinstance(failed.value.error, OSError) and failed.value.size > 0
    saver.wait()                           # reported once


BACKGROUND_SAVE_THEN_DIE = """
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
from pathlib import Path
from cifar_ddp import checkpoint as ckpt
directory = Path({directory!r})
saver = ckpt.BackgroundSaver()
saver.submit(directory, {{"model": {{"v": torch.zeros(3)}}, "config": {{}}}}, 1, 2, False, 1)
saver.wait()
def die(fd):
    os.kill(os.getpid(), signal.SIGKILL)   # the writer thread is killed with its process, bytes written
os.fsync = die
saver.submit(directory, {{"model": {{"v": torch.ones(3)}}, "config": {{}}}}, 2, 2, False, 2)
saver.wait()
"""


def test_a_process_killed_during_a_background_save_keeps_the_previous_checkpoint(tmp_path: Path):
    directory = tmp_path / "checkpoints"
    done = subprocess.run([sys.executable, "-c", BACKGROUND_SAVE_THEN_DIE.format(repo=str(REPO),
                                                                                directory=str(directory))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert list(directory.glob(".*.tmp")), "the killed save left its temporary file"
    assert torch.equal(ckpt.load_file(directory / "last.pt")["model"]["v"], torch.zeros(3))
    assert [step for step, _ in ckpt.step_files(directory)] == [1]
    path, payload = ckpt.find_resumable(directory)
    assert path.name == ckpt.step_file_name(1, 1) and torch.equal(payload["model"]["v"], torch.zeros(3))


def _payload(value: float) -> bytes:
    return ckpt.encode({"model": {"w": torch.full((4096,), value)}, "config": {}})


SAVES_IN_A_LOOP = """
import sys, torch
sys.path.insert(0, {repo!r})
from cifar_ddp import checkpoint as ckpt
from pathlib import Path
for value in range(1, 301):
    ckpt.write_file(Path({path!r}), ckpt.encode({{"model": {{"w": torch.full((4096,), float(value))}}, "config": {{}}}}))
"""


def test_a_reader_never_finds_a_checkpoint_corrupt_while_a_training_replaces_it(tmp_path: Path, monkeypatch):
    """evaluate.py on last.pt of a running training: the file is renamed in, then its
    checksum, so a reader between the two renames (or one whose two reads straddle them)
    sees a disagreeing pair. It must read again, not call the file damaged."""
    waits = []
    monkeypatch.setattr(ckpt, "_wait_for_writer", lambda: waits.append(1))
    path = tmp_path / "last.pt"
    ckpt.write_file(path, _payload(0.0))
    training = subprocess.Popen([sys.executable, "-c", SAVES_IN_A_LOOP.format(repo=str(REPO), path=str(path))])
    seen = []
    try:
        while training.poll() is None:
            seen.append(float(ckpt.load_file(path)["model"]["w"][0]))
    finally:
        training.kill()
        training.wait(timeout=60)
    assert training.returncode == 0
    assert len(set(seen)) > 10 and waits, "no read met a save half-way: the test proved nothing"
    assert seen == sorted(seen)   # each read is one whole save, never an older one after a newer


def test_a_damaged_checkpoint_is_reported_at_once_and_after_the_grace_if_a_writer_seems_stuck(tmp_path: Path,
                                                                                              monkeypatch):
    waits = []
    monkeypatch.setattr(ckpt, "_wait_for_writer", lambda: waits.append(1))
    path = tmp_path / "last.pt"
    ckpt.write_file(path, _payload(1.0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 differs from last.pt.sha256"):
        ckpt.load_file(path)
    assert not waits, "no writer is at work: nothing to wait for"
    # A writer killed between its renames leaves its pending checksum: waited for, then reported.
    (tmp_path / ".last.pt.sha256.abc123.tmp").write_text("x")
    monkeypatch.setattr(ckpt, "_WRITER_GRACE_S", 0.3)
    with pytest.raises(ckpt.CheckpointError, match="disagrees with last.pt.sha256 while a save to it is pending"):
        ckpt.load_file(path)
    assert waits, "a pending save was not waited for"


def test_a_pending_write_is_undone_when_its_body_fails_and_the_bodys_error_is_left_as_it_is(tmp_path: Path):
    import errno

    from cifar_ddp import files

    target = tmp_path / "last.pt.sha256"
    target.write_text("old")
    with pytest.raises(OSError) as info:
        with files.pending_write(target, b"new"):
            assert files.pending_names(target)        # visible while the body runs
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename is None                # not renamed after the checksum file
    assert target.read_text() == "old" and not files.pending_names(target)
    with files.pending_write(target, b"new"):
        pass
    assert target.read_bytes() == b"new" and not files.pending_names(target)
