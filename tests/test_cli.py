"""The `cifar-ddp` command, packaged configs by name, --print-config, the did-you-mean of a
misspelt key, the notebook API (the README's snippet, run as written) and the safetensors
export it loads."""

import dataclasses
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cifar_ddp import checkpoint as ckpt
from cifar_ddp import cli
from cifar_ddp.config import Config, ConfigError, config_from_dict, load_config
from cifar_ddp.errors import UserError

from conftest import REPO, job_env, run_job, tiny_overrides

CONFIGS = REPO / "configs"


def cli_main(capsys, *argv: str):
    """`cifar-ddp ARGV` in this process: (status, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:      # argparse: --help, a usage error
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# --------------------------------------------------------------------------- configs by name


def test_a_bare_name_is_the_packaged_config_from_any_folder_and_a_path_is_a_path(tmp_path: Path, monkeypatch):
    by_path = load_config(CONFIGS / "seed.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_config("seed") == by_path
    # rules: rules/seed.yaml still resolves beside the config file, not in the current folder.
    rules = yaml.safe_load((CONFIGS / "rules" / "seed.yaml").read_text())
    assert load_config("seed").rules.max_params == rules["max_params"] == 150576
    # A name with a suffix or a folder is a path: here a smoke.yaml of the user's own.
    (tmp_path / "smoke.yaml").write_text("train:\n  epochs: 7\n")
    assert load_config("smoke.yaml").train.epochs == 7
    assert load_config("smoke").train.epochs == yaml.safe_load((CONFIGS / "smoke.yaml").read_text())["train"]["epochs"]
    with pytest.raises(ConfigError, match=r"config file 'smok' does not exist; did you mean smoke\? .*fast85, "):
        load_config("smok")
    with pytest.raises(ConfigError, match="does not exist; pass an existing YAML"):
        load_config("nothing/like/it.yaml")


def test_configs_lists_every_packaged_config_with_its_first_comment_line(capsys):
    code, out, _ = cli_main(capsys, "configs")
    assert code == 0
    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, f"{path.name} has no one-line purpose"
        assert re.search(rf"^  {re.escape(path.stem)} +{re.escape(first[2:])}$", out, re.M), path.name
    assert f"files in {CONFIGS}" in out


# --------------------------------------------------------------------------- --print-config


def test_print_config_is_what_would_run_and_reads_back_as_the_same_config(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli_main(capsys, "train", "--config", "smoke", "train.epochs=3", "--print-config", "--resume")
    assert code == 0 and not (tmp_path / "runs").exists()          # it only printed
    printed = yaml.safe_load(out)
    assert printed["train"]["epochs"] == 3 and printed["train"]["resume"] == "latest"
    assert printed["train"]["momentum"] == 0.9 and printed["augment"]["cutout_size"] == 16   # defaults, too
    assert set(printed) == {f.name for f in dataclasses.fields(Config)}
    expected = load_config(CONFIGS / "smoke.yaml", ["train.epochs=3", "train.resume=latest"])
    assert config_from_dict(printed) == expected
    (tmp_path / "printed.yaml").write_text(out)
    assert load_config(tmp_path / "printed.yaml") == expected

    # The default --config is the packaged seed, from any folder; lr-find prints the same way.
    code, out, _ = cli_main(capsys, "lr-find", "--print-config")
    assert code == 0 and config_from_dict(yaml.safe_load(out)) == load_config(CONFIGS / "seed.yaml")
    code, _, err = cli_main(capsys, "train", "--print-config", "train.epoch=3")
    assert code == 2 and err.startswith("error: unknown config key 'train.epoch'; did you mean 'train.epochs'?")


def test_help_of_train_and_lr_find_names_print_config(capsys):
    for command in ("train", "lr-find"):
        code, out, _ = cli_main(capsys, command, "--help")
        assert code == 0 and "--print-config" in out and f"usage: cifar-ddp {command}" in out


@pytest.mark.parametrize("override, unknown, suggestion", [
    ("train.epoch=3", "train.epoch", "did you mean 'train.epochs'?"),
    ("train.learning_rate=0.1", "train.learning_rate", None),       # nothing near: no guess
    ("epochs=3", "epochs", "did you mean 'train.epochs'?"),         # the right key in the wrong section
    ("modle.name=seed", "modle", "did you mean 'model'?"),          # a misspelt section
])
def test_a_misspelt_key_suggests_the_nearest_one(override, unknown, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"unknown config key '{unknown}';") and "allowed keys under" in message
    assert (suggestion in message) if suggestion else ("did you mean" not in message)


def test_launch_scripts_take_the_same_arguments_as_the_subcommands(capsys, monkeypatch):
    def options(text: str) -> list:
        return sorted(set(re.findall(r"--[a-z][a-z-]+", text.split("options:")[1])))

    for script, command in (("train.py", "train"), ("evaluate.py", "evaluate"), ("export.py", "export"),
                            ("predict.py", "predict"), ("lr_find.py", "lr-find")):
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / "launch" / script), run_name="under_test")["main"]()
        wrapper = capsys.readouterr().out
        assert done.value.code == 0 and wrapper.startswith(f"usage: launch/{script}")
        _, direct, _ = cli_main(capsys, command, "--help")
        assert options(wrapper) == options(direct) and len(options(direct)) >= 2


def test_unknown_command_and_no_command_are_usage_errors(capsys):
    code, _, err = cli_main(capsys, "trian")
    assert code == 2 and "invalid choice: 'trian'" in err
    code, _, err = cli_main(capsys)
    assert code == 2 and "COMMAND" in err
    code, out, _ = cli_main(capsys, "--help")
    assert code == 0 and all(name in out for name in cli.COMMANDS)


def test_python_m_cifar_ddp_runs_the_command_and_import_stays_light(tmp_path: Path):
    done = run_job([sys.executable, "-m", "cifar_ddp", "configs"], cwd=tmp_path)
    assert done.returncode == 0 and re.search(r"^  smoke +A run of a few seconds", done.stdout, re.M), done.stderr
    probe = ("import sys, cifar_ddp; print(sorted(m for m in ('cifar_ddp.api', 'cifar_ddp.trainer') "
             "if m in sys.modules)); print(cifar_ddp.train.__module__, cifar_ddp.load_model.__module__)")
    done = run_job([sys.executable, "-c", probe], cwd=tmp_path)
    assert done.stdout.split("\n")[:2] == ["[]", "cifar_ddp.api cifar_ddp.api"], done.stderr


# --------------------------------------------------------------------------- the notebook API


def readme_snippet() -> str:
    """The README's notebook snippet: the python block after the marker that names this test."""
    text = (REPO / "README.md").read_text()
    after = text.split("<!-- tests/test_cli.py runs this snippet -->", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """The README's snippet, run as written in a fresh folder: its variables."""
    folder = tmp_path_factory.mktemp("notebook")
    here = Path.cwd()
    namespace: dict = {}
    try:
        os.chdir(folder)
        exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    finally:
        os.chdir(here)
    namespace["folder"] = folder
    return namespace


def test_readme_snippet_trains_in_process_and_returns_metrics_and_best_checkpoint(notebook):
    from cifar_ddp.distributed import DistContext
    from cifar_ddp.evaluation import evaluate_checkpoint

    result = notebook["result"]
    best = notebook["folder"] / result.best_checkpoint
    assert best == notebook["folder"] / "runs" / "notebook" / "checkpoints" / "best.pt" and best.is_file()
    payload = ckpt.load_file(best)
    # The metrics returned are those of the saved weights, scored again from the file.
    again = evaluate_checkpoint(payload, config_from_dict(payload["config"]), DistContext())
    assert result.metrics["test_accuracy"] == again["correct"] / again["images"]
    assert result.metrics["best_test_accuracy"] == payload["train_state"]["best_accuracy"]
    assert result.metrics["epochs"] == payload["config"]["train"]["epochs"] == 1


def test_load_model_is_the_checkpoints_network_behind_its_normalization(notebook):
    from cifar_ddp.models import build_model

    model, images = notebook["model"], notebook["images"]
    payload = ckpt.load_file(notebook["folder"] / notebook["result"].best_checkpoint)
    # By hand: the network rebuilt from the config, the weights loaded, (x - mean) / std, fp32.
    network = build_model(payload["config"])
    network.load_state_dict(payload["model"])
    network.eval()
    mean = torch.tensor(payload["stats"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(payload["stats"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = network((images - mean) / std)
        assert torch.allclose(model(images), expected, atol=1e-6, rtol=0)
    assert not model.training and model.classes == list(payload["classes"])
    assert notebook["predicted"] == [model.classes[i] for i in expected.argmax(1)]


def test_a_runs_saved_config_json_passed_back_as_config_is_the_same_recipe(notebook, capsys):
    run = notebook["folder"] / "runs" / "notebook"
    payload = ckpt.load_file(run / "checkpoints" / "best.pt")
    assert load_config(run / "config.json") == config_from_dict(payload["config"])
    code, out, _ = cli_main(capsys, "train", "--config", str(run / "config.json"), "--print-config")
    assert code == 0 and config_from_dict(yaml.safe_load(out)) == config_from_dict(payload["config"])


def test_api_raises_user_errors_instead_of_exiting(tmp_path: Path):
    import cifar_ddp

    with pytest.raises(UserError, match="did you mean 'train.epochs'"):
        cifar_ddp.train("smoke", ["train.epoch=1"], out_dir=str(tmp_path))
    with pytest.raises(UserError, match="did you mean 'train.epochs'"):
        cifar_ddp.train({"train": {"epoch": 1}})
    with pytest.raises(UserError, match="pass a list of key=value strings"):
        cifar_ddp.train("smoke", "train.epochs=1")
    with pytest.raises(UserError, match="neither a checkpoint"):
        cifar_ddp.load_model(tmp_path)
    assert not any(tmp_path.iterdir())     # nothing was started


def test_keyword_settings_keep_their_types():
    from cifar_ddp.api import _dotted

    dotted = _dotted({"out_dir": "runs/x", "train": {"epochs": 2, "lr": 1e-5}, "model": {"args": {"tag": "1"}},
                      "augment.hflip_p": 0.0})
    assert dotted == ['out_dir="runs/x"', "train.epochs=2", "train.lr=1e-05", 'model.args.tag="1"',
                      "augment.hflip_p=0.0"]
    cfg = load_config(None, dotted)
    assert (cfg.out_dir, cfg.train.epochs, cfg.train.lr, cfg.model.args, cfg.augment.hflip_p) == \
        ("runs/x", 2, 1e-5, {"tag": "1"}, 0.0)


# --------------------------------------------------------------------------- safetensors


def test_safetensors_export_holds_the_checkpoints_weights_bitwise_and_loads_to_the_same_logits(notebook, capsys,
                                                                                               tmp_path: Path):
    import cifar_ddp
    from safetensors import safe_open

    best = notebook["folder"] / notebook["result"].best_checkpoint
    out = tmp_path / "hub"
    code, stdout, err = cli_main(capsys, "export", "--checkpoint", str(best), "--format", "safetensors",
                                 "--out", str(out), "--parity-images", "32")
    assert code == 0, err
    assert "max |logit difference| 0.00e+00" in stdout and "top-1 agrees on 32/32" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]               # no staging folder left
    payload = ckpt.load_file(best)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        exported = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata()
    assert exported.keys() == payload["model"].keys()
    for name, tensor in payload["model"].items():
        mine = exported[name]
        assert mine.dtype == tensor.dtype and mine.shape == tensor.shape, name
        assert mine.numpy().tobytes() == tensor.contiguous().numpy().tobytes(), name      # bit for bit
    assert metadata["weights"] == "raw" and json.loads(metadata["classes"]) == list(payload["classes"])
    assert json.loads((out / "config.json").read_text()) == payload["config"]

    images = notebook["images"]
    with torch.no_grad():
        from_export = cifar_ddp.load_model(out)(images)
        from_file = cifar_ddp.load_model(out / "model.safetensors")(images)
        from_checkpoint = cifar_ddp.load_model(best)(images)
    assert torch.equal(from_export, from_checkpoint) and torch.equal(from_file, from_checkpoint)

    # Again: refused without --force; with it, an earlier export is replaced, a run's folder never.
    code, _, err = cli_main(capsys, "export", "--checkpoint", str(best), "--format", "safetensors", "--out", str(out))
    assert code == 2 and "already holds model.safetensors and config.json; pass --force" in err
    run = notebook["folder"] / "runs" / "notebook"
    before = (run / "config.json").read_bytes()
    code, _, err = cli_main(capsys, "export", "--checkpoint", str(best), "--format", "safetensors", "--out", str(run),
                            "--force")
    assert code == 2 and "is not an earlier export" in err and (run / "config.json").read_bytes() == before
    assert not (run / "model.safetensors").exists()
    code, _, err = cli_main(capsys, "export", "--checkpoint", str(best), "--format", "safetensors", "--out", str(out),
                            "--force", "--parity-images", "8")
    assert code == 0, err


def test_predict_reads_a_safetensors_export_like_its_checkpoint(notebook, capsys, tmp_path: Path):
    from PIL import Image

    best = notebook["folder"] / notebook["result"].best_checkpoint
    out = tmp_path / "hub"
    assert cli_main(capsys, "export", "--checkpoint", str(best), "--format", "safetensors", "--out", str(out),
                    "--parity-images", "8")[0] == 0
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(picture)
    answers = [cli_main(capsys, "predict", "--model", str(model), "--json", "--top", "3", str(picture))
               for model in (best, out, out / "model.safetensors")]
    assert all(code == 0 for code, _, _ in answers)
    assert answers[0][1] == answers[1][1] == answers[2][1]


# --------------------------------------------------------------------------- torchrun -m cifar_ddp


@pytest.mark.slow
def test_torchrun_runs_the_module_with_two_processes(tmp_path: Path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "cifar_ddp", "train", "--config", "smoke", *tiny_overrides(tmp_path / "run", **{"train.epochs": 1})]
    done = subprocess.run(command, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    final = [line for line in done.stdout.splitlines() if line.startswith("final: ")]
    assert len(final) == 1 and '"world_size": 2' in final[0]
    assert (ckpt.checkpoint_dir(tmp_path / "run") / "best.pt").is_file()
