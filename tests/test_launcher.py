"""The entry scripts' exit paths, in process: a user error is one line and status 2, a full
or read-only disk is a user error, a preempted run exits 75, a closed pipe 1 without a
traceback, and anything else is not swallowed."""

import errno
import signal

import pytest

from cifar_ddp import launcher
from cifar_ddp.config import load_config
from cifar_ddp.errors import UserError
from cifar_ddp.errors import Preempted, exit_on_user_error


@pytest.fixture(autouse=True)
def alone(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)     # the preempted path ignores SIGTERM from then on


def launch(error):
    def work(cfg, loaded, ctx):
        if error is not None:
            raise error
    return launcher._launch(lambda: (load_config(None, ["device=cpu"]), None), work)


def test_success_is_0():
    assert launch(None) == 0


def test_a_user_error_is_one_line_and_status_2(capsys):
    assert launch(UserError("train.lr is wrong")) == launcher.EXIT_USER_ERROR == 2
    err = capsys.readouterr().err
    assert err == "error: train.lr is wrong\n"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_disk_that_cannot_be_written_is_a_user_error(capsys, code):
    assert launch(OSError(code, "no", "/runs/x/training_log.md")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write '/runs/x/training_log.md'") and "--resume" in err


def test_a_preempted_run_exits_75():
    assert launch(Preempted()) == launcher.EXIT_RESUMABLE == 75
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_a_reader_that_left_is_status_1_without_a_traceback(monkeypatch, capfd):
    redirected = []
    monkeypatch.setattr(launcher.os, "dup2", lambda *args: redirected.append(args))   # keep pytest's stdout
    assert launch(BrokenPipeError()) == 1
    assert len(redirected) == 1 and "Traceback" not in capfd.readouterr().err


def test_any_other_failure_of_a_single_process_is_raised():
    with pytest.raises(ZeroDivisionError):
        launch(ZeroDivisionError())


def test_single_process_tools_turn_a_user_error_into_status_2(capsys):
    def work():
        raise UserError("no such model")
    assert exit_on_user_error(work) == 2
    assert capsys.readouterr().err == "error: no such model\n"
    assert exit_on_user_error(lambda: 0) == 0
