"""benchmarks/model_speed.py times each network as its recipe trains it: the model, widths,
augmentation and batch size handed to the timed step are the recipe's. Bad input is one
line and exit status 2. (No timing is asserted: tests never depend on wall time.)"""
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from conftest import REPO, job_env

sys.path.insert(0, str(REPO / "benchmarks"))
import model_speed  # noqa: E402
from throughput import make_config  # noqa: E402


def timed_config(recipe: str, batch_size: int = 0, for_all=()):
    label, config, overrides = model_speed.parse_recipe(recipe)
    args = Namespace(batch_size=batch_size, timed_images=6144, warmup_images=2048, images=2048, set=list(for_all))
    run = model_speed.recipe_args(args, config, overrides, torch.device("cpu"))
    return label, run, make_config(run)   # the config benchmarks/throughput.py's step is built from


def test_each_recipe_is_timed_with_its_own_model_batch_and_augmentation():
    label, run, cfg = timed_config("sep=configs/sep_resnet10.yaml")
    assert label == "sep"
    assert (cfg.model.name, cfg.model.widths, cfg.model.dropout) == ("sep_resnet", [], 0.0)
    assert cfg.train.batch_size == 512 and run.steps == 12 and run.warmup == 4   # 6,144 and 2,048 images
    assert (cfg.augment.affine_p, cfg.augment.cutout_p) == (0.5, 0.5)

    _, run, cfg = timed_config("seed=configs/fast85.yaml")
    assert (cfg.model.name, cfg.model.dropout, cfg.train.batch_size, run.steps) == ("seed", 0.0, 128, 48)

    _, _, cfg = timed_config("wide=configs/sep_resnet10.yaml:model.widths=[32,64,96,128],augment.cutout_p=0", 256)
    assert (cfg.model.widths, cfg.augment.cutout_p, cfg.train.batch_size) == ([32, 64, 96, 128], 0.0, 256)


@pytest.mark.parametrize("recipe,says", [
    ("no-equals-sign", "is not LABEL=CONFIG"),
    ("x=configs/nope.yaml", "no config file"),
    ("x=configs/sep_resnet10.yaml:model.name=resnet", "model.name"),
    # the trainer refuses a captured step on a CPU; so does the benchmark, before timing anything
    ("x=configs/fast85_gpu.yaml", "train.cuda_graph=true needs a CUDA GPU"),
])
def test_a_bad_recipe_is_one_line_and_exit_2(recipe, says):
    if "cuda_graph" in says and torch.cuda.is_available():
        pytest.skip("a CUDA GPU runs the captured step")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "model_speed.py"), "--recipe", recipe],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr


def test_set_applies_to_every_recipe_and_lifts_a_cuda_only_option():
    # fast85_gpu's captured step is CUDA-only; --set train.cuda_graph=false times its network,
    # batch and augmentation on the CPU, and --set batch sizes count for the step sizes.
    _, run, cfg = timed_config("gpu=configs/fast85_gpu.yaml", for_all=["train.cuda_graph=false"])
    assert (cfg.model.name, cfg.train.batch_size, cfg.train.cuda_graph, run.steps) == ("seed", 512, False, 12)
    _, run, cfg = timed_config("sep=configs/sep_resnet10.yaml", for_all=["train.batch_size=128"])
    assert (cfg.train.batch_size, run.batch_size, run.steps) == (128, 128, 48)


def test_wall_time_prints_a_breakdown_that_adds_up_to_the_start_to_exit_time():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "wall_time.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
                           "data.source=fake", "data.fake_size=64", "train.epochs=1", "train.batch_size=16"],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip().strip("*"): float(line.split("|")[2].strip().strip("*"))
            for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| phase")}
    total = rows.pop("start to exit")
    assert set(rows) == {"start-up", "data", "build", "set-up", "training steps", "evaluation", "checkpoints",
                         "logging", "other", "teardown"}
    assert abs(sum(rows.values()) - total) <= 0.011 * len(rows)      # each row is rounded to 0.01 s
    share = float(done.stdout.strip().splitlines()[-1].split("=")[1])
    assert share == pytest.approx(rows["training steps"] / total, abs=2e-3)
