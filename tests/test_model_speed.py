"""benchmarks/model_speed.py's grid mode (gpu_check.sh issue29_sep): each case's line carries
its ratio to the baseline measured in the same round, and with --keep-going a case that fails
is one FAILED line while the others are still measured, then exit status 1. The timed step
is replaced by fixed speeds: what is checked is the arithmetic and the bookkeeping."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import model_speed  # noqa: E402

# The baseline slows down in round 2 (a machine that changes pace); the others do not.
SPEEDS = {"seed": [1000.0, 500.0], "sep_native": [250.0, 250.0], "sep_spread": [400.0, 400.0]}


def run(monkeypatch, capsys, *flags):
    calls = {label: 0 for label in SPEEDS}

    def fake_measure(run_args):
        paths = [o.split("=")[1] for o in run_args.set if o.startswith("model.dilated_depthwise=")]
        label = f"sep_{paths[0]}" if paths else "seed"
        if label == "sep_native" and "--fail-native" in flags:
            raise RuntimeError("capture refused\nsecond line")
        calls[label] += 1
        return SPEEDS[label][calls[label] - 1]

    monkeypatch.setattr(model_speed, "measure_cifar_ddp", fake_measure)
    argv = ["model_speed.py", "--repeats", "2", "--recipe", "seed=configs/fast85.yaml",
            "--recipe", "sep_native=configs/sep_resnet10.yaml:model.dilated_depthwise=native",
            "--recipe", "sep_spread=configs/sep_resnet10.yaml:model.dilated_depthwise=spread",
            *[f for f in flags if f != "--fail-native"]]
    monkeypatch.setattr(sys, "argv", argv)
    status = model_speed.main()
    return status, capsys.readouterr().out.splitlines()


def test_every_case_line_has_its_ratio_to_the_baseline_of_its_round(monkeypatch, capsys):
    status, lines = run(monkeypatch, capsys)
    assert status == 0
    rounds = [line for line in lines if line.startswith("round ")]
    assert len(rounds) == 6 and "ratio" not in rounds[0] and "ratio" not in rounds[3]
    assert rounds[1].endswith("250.0 images/s, ratio_vs_seed=0.25")
    assert rounds[2].endswith("400.0 images/s, ratio_vs_seed=0.40")
    assert rounds[4].endswith("250.0 images/s, ratio_vs_seed=0.50")   # against round 2's 500
    assert rounds[5].endswith("400.0 images/s, ratio_vs_seed=0.80")
    # The summary: medians over rounds, 250 / 750 and 400 / 750.
    assert lines[-1] == "ratio_vs_seed[sep_native]=0.33 ratio_vs_seed[sep_spread]=0.53"


def test_keep_going_names_a_failed_case_and_measures_the_rest(monkeypatch, capsys):
    status, lines = run(monkeypatch, capsys, "--keep-going", "--fail-native")
    assert status == 1
    failed = [line for line in lines if "FAILED" in line]
    # Once in its round (not retried in round 2), once in the summary; the message's first line.
    assert len(failed) == 2 and all(line.endswith("FAILED (RuntimeError: capture refused)") for line in failed)
    assert lines[-1] == "ratio_vs_seed[sep_spread]=0.53"


def test_without_keep_going_a_failed_case_stops_the_run(monkeypatch, capsys):
    with pytest.raises(RuntimeError, match="capture refused"):
        run(monkeypatch, capsys, "--fail-native")
