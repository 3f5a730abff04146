"""Where the wall time goes (cifar_ddp/timing.py): exclusive phase clocks, hand-worked on a
fake clock; the process age against a known sleep; and a real run whose breakdown adds up
to its wall, with what no phase claims kept small. Plus train.eval_every_epochs."""

import subprocess
import sys

import pytest

from cifar_ddp import timing
from conftest import REPO, job_env, train_in_process


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_phase_inside_another_pauses_it_and_the_rest_is_other(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    clock = timing.PhaseClock()                   # not since the process started: start-up 0
    fake.now += 1.0                               # 1 s nobody claims
    with clock.phase("training steps"):
        fake.now += 2.0
        with clock.phase("checkpoints"):          # a mid-epoch save: 0.5 s, not training
            fake.now += 0.5
        fake.now += 3.0
    with clock.phase("evaluation"):
        fake.now += 0.25
    clock.move("training steps", "set-up", 1.5)   # the first step's set-up, measured inside
    parts = clock.breakdown()
    assert parts["training steps"] == 3.5 and parts["set-up"] == 1.5 and parts["checkpoints"] == 0.5
    assert parts["evaluation"] == 0.25 and parts["other"] == 1.0 and parts["start-up"] == 0.0
    assert parts["wall"] == 6.75 == sum(v for k, v in parts.items() if k != "wall")
    table = timing.format_breakdown(parts)
    assert "| training steps | 3.50 | 51.9% |" in table and "| **wall** | **6.75** |" in table
    assert "- training steps: 3.50 s (51.9%)" in timing.format_breakdown(parts, as_list=True)


def test_the_process_age_counts_from_the_interpreters_start():
    code = "import time; time.sleep(1.5); from cifar_ddp.timing import process_age; print(process_age())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert 1.5 <= float(done.stdout) < 60


def test_a_runs_breakdown_adds_up_to_its_wall_and_names_almost_all_of_it(tmp_path):
    result = train_in_process(tmp_path / "run", **{"train.epochs": 3, "train.eval_every_epochs": 2,
                                                   "train.checkpoint_every_steps": 4})
    parts = result["wall_time_s"]
    assert set(parts) == {*timing.PHASES, "wall"}
    assert abs(sum(v for k, v in parts.items() if k != "wall") - parts["wall"]) < 0.01
    for phase in ("data", "build", "training steps", "evaluation", "checkpoints", "logging"):
        assert parts[phase] > 0, phase
    assert parts["other"] <= 0.1 * parts["wall"], parts
    log = (tmp_path / "run" / "training_log.md").read_text()
    assert "## Where the wall time went" in log and "\n- training steps: " in log
    # eval_every_epochs=2 over 3 epochs: epochs 2 and 3 (the last) are scored, epoch 1 is not.
    rows = [line for line in log.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
            or line.startswith("| 3 |")]
    assert [row.split("|")[5].strip() == "-" for row in rows] == [True, False, False]


def test_eval_every_epochs_must_be_at_least_one(tmp_path):
    from cifar_ddp.config import load_config
    from cifar_ddp.errors import ConfigError

    with pytest.raises(ConfigError, match="train.eval_every_epochs must be at least 1"):
        load_config(None, ["train.eval_every_epochs=0"])


def test_cudnn_benchmark_limit_takes_zero_and_refuses_a_negative_count():
    from cifar_ddp.config import load_config
    from cifar_ddp.errors import ConfigError

    assert load_config(None, ["train.cudnn_benchmark_limit=0"]).train.cudnn_benchmark_limit == 0
    assert load_config(None, []).train.cudnn_benchmark_limit == 10   # PyTorch's own default
    with pytest.raises(ConfigError, match="train.cudnn_benchmark_limit must be >= 0"):
        load_config(None, ["train.cudnn_benchmark_limit=-1"])
