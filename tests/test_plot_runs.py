"""benchmarks/plot_runs.py reads runs' training_log.md tables: accuracy by epoch and against
training time (the log's own epoch times summed, or epochs at one measured pace), every run
in one time unit, epochs without evaluation left out; bad --run specs are one line, exit 2."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, job_env

sys.path.insert(0, str(REPO / "benchmarks"))
import plot_runs  # noqa: E402

RULE = "|---:|---:|---:|---:|---:|---:|---:|---:|\n"


def write_log(path: Path, split: str, rows, images: int = 45000) -> Path:
    """A training_log.md as cifar_ddp.loggers writes it: rows are (epoch, acc or None, seconds)."""
    text = (f"# Training log\n\n- world size: 1\n- train images: {images}\n- {split} images: 5000\n\n"
            f"| epoch | lr | train loss | train acc | {split} loss | {split} acc | time (s) | images/s |\n" + RULE)
    for epoch, acc, seconds in rows:
        scored = "- | -" if acc is None else f"0.9000 | {acc:.2f}%"
        text += f"| {epoch} | 0.1 | 1.0000 | 50.00% | {scored} | {seconds:.1f} | 300 |\n"
    path.write_text(text + "\n- final val_accuracy: 0.8\n")
    return path


def test_a_log_with_an_unevaluated_epoch_keeps_its_time_but_not_a_point(tmp_path):
    log = write_log(tmp_path / "a.md", "val", [(1, 40.0, 100.0), (2, None, 110.0), (3, 60.5, 90.0)])
    epochs, accuracy, seconds, images, split = plot_runs.read_log(log)
    assert (epochs, accuracy, seconds, images, split) == ([1, 3], [40.0, 60.5], [100.0, 110.0, 90.0], 45000, "val")
    # Epoch 3 ends after all three epochs' training: 100 + 110 + 90 s.
    assert plot_runs.training_seconds(epochs, seconds, images, "") == [100.0, 300.0]
    # At a measured 150 images/s an epoch of 45,000 images is 300 s.
    assert plot_runs.training_seconds(epochs, seconds, images, "150") == [300.0, 900.0]


def run(tmp_path, *specs):
    argv = [sys.executable, str(REPO / "benchmarks" / "plot_runs.py"), "--out", str(tmp_path / "p.png")]
    for spec in specs:
        argv += ["--run", spec]
    return subprocess.run(argv, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)


def test_the_plot_is_written_and_bad_runs_are_one_line_exit_2(tmp_path):
    short = write_log(tmp_path / "short.md", "test", [(1, 50.0, 30.0), (2, 60.0, 30.0)], images=50000)
    long = write_log(tmp_path / "long.md", "test", [(1, 55.0, 400.0), (2, 65.0, 400.0)], images=50000)
    done = run(tmp_path, f"short={short}", f"long={long}@100")
    assert done.returncode == 0 and (tmp_path / "p.png").stat().st_size > 0, done.stderr
    for spec, fragment in [("no_equals_sign", "give it as LABEL=PATH"),
                           (f"x={tmp_path / 'missing.md'}", "no file"),
                           (f"x={short}@fast", "images per second"),
                           (f"x={tmp_path / 'p.png'}", "has no epoch table")]:
        failed = run(tmp_path, spec)
        assert failed.returncode == 2, (spec, failed.stderr)
        assert fragment in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.parametrize("unit_seconds, expected", [(500.0, "training time (s)"), (700.0, "training time (min)")])
def test_one_time_unit_for_every_run(tmp_path, monkeypatch, unit_seconds, expected):
    # One run with its own epoch times and one placed at a rate: both in the same unit,
    # minutes as soon as one of them passes 10 minutes.
    own = write_log(tmp_path / "own.md", "test", [(1, 50.0, unit_seconds / 2), (2, 60.0, unit_seconds / 2)])
    paced = write_log(tmp_path / "paced.md", "test", [(1, 50.0, 1.0)], images=30000)   # 30,000 / 100 = 300 s
    made = []
    real = plot_runs.plt.subplots

    def recording_subplots(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        made.append(axes)
        return fig, axes

    monkeypatch.setattr(plot_runs.plt, "subplots", recording_subplots)
    monkeypatch.setattr(sys, "argv", ["plot_runs.py", "--out", str(tmp_path / "p.png"),
                                      "--run", f"own={own}", "--run", f"paced={paced}@100"])
    plot_runs.main()
    by_time = made[0][1]
    assert by_time.get_xlabel() == expected
    per_unit = 60.0 if "min" in expected else 1.0
    own_x = next(list(l.get_xdata()) for l in by_time.get_lines() if l.get_label() == "own")
    paced_x = next(list(l.get_xdata()) for l in by_time.get_lines() if l.get_label() == "paced")
    assert own_x == pytest.approx([unit_seconds / 2 / per_unit, unit_seconds / per_unit])
    assert paced_x == pytest.approx([300.0 / per_unit])
    assert by_time.get_ylabel() == "test accuracy (%)"
