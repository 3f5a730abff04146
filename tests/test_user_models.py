"""A user's own network: the registry, references by file and by module, the design rules,
every bad reference as one line and exit 2, and checkpoints that never run code nobody named."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_ddp import checkpoint as ckpt
from cifar_ddp import rules
from cifar_ddp.config import RulesConfig, load_config
from cifar_ddp.distributed import DistContext
from cifar_ddp.errors import ConfigError
from cifar_ddp.models import build_model, register_model, registered_names, resolve
from cifar_ddp.receptive_field import receptive_field

from conftest import REPO, final_weights, job_env, run_job, tiny_overrides, torchrun, train_in_process

EXAMPLE = f"{REPO}/examples/tiny_net.py:TinyNet"
OLD = REPO / "tests" / "data" / "main_f4f7ebd"
SEED_RULES = load_config(REPO / "configs" / "seed.yaml").rules


def example_module():
    return sys.modules[resolve(EXAMPLE).builder.__module__]


# ------------------------------------------------------------------ registry and old checkpoints


def test_builtin_models_are_registered_entries_with_their_settings():
    assert registered_names() == ("mixgate", "seed", "sep_resnet")
    seed, sep = resolve("seed"), resolve("sep_resnet")
    assert (seed.default_widths, seed.residual, seed.cam_layer) == ([16, 32, 64], False, "c4")
    assert (sep.default_widths, sep.residual, sep.cam_layer) == ([48, 96, 128, 192], True, "c4")
    assert "widths=(16, 32, 64)" in seed.describe_arguments()


def test_register_model_on_a_function_builds_it_and_refuses_a_second_owner_of_the_name():
    @register_model("test_tiny_function")
    def tiny(width: int = 4, num_classes: int = 10):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, num_classes))

    model = build_model(load_config(None, ["model.name=test_tiny_function", "model.args.width=6"]))
    assert model[0].out_channels == 6
    with pytest.raises(ConfigError, match="already registered"):
        register_model("test_tiny_function")(lambda: nn.Identity())
    with pytest.raises(TypeError, match="nn.Module subclass or a function"):
        register_model("test_not_a_module")(int)


@pytest.mark.parametrize("name, widths", [("seed", "[4,8,8]"), ("sep_resnet", "[4,8,8,8]")])
def test_checkpoints_written_by_earlier_main_load_evaluate_and_resume_the_same(tmp_path: Path, name, widths,
                                                                              one_thread):
    """tests/data/main_f4f7ebd holds runs of main before the registry (fp32, one thread, as here):
    a fresh run must reach the old epoch-1 weights, and resuming the old epoch-1 file must end
    at the old epoch-2 file's weights, its step, learning rate and random state."""
    # fp32: precision=auto takes bf16 on a CPU with AMX / AVX-512 bf16, whose rounding grows to
    # 10% of a step within three. In fp32 another CPU's kernels still sum in another order, so
    # the weights are compared to a tolerance below what a change to training moves them.
    # No shift-scale-rotate: its bilinear resampling turns a last-bit difference between CPUs
    # into a 1e-3 change within three steps (seen between an Intel and an AMD EPYC machine).
    # Flip, CoarseDropout and dropout stay, so every random stream is still drawn and restored.
    common = [f"model.name={name}", f"model.widths={widths}", "data.fake_size=96", "train.progress_bar=false",
              "train.precision=fp32", "augment.affine_p=0"]
    from cifar_ddp.trainer import run

    fresh = tmp_path / "fresh"
    run(load_config(REPO / "configs" / "smoke.yaml", [*common, f"out_dir={fresh}", "train.epochs=1"]), DistContext())
    old1 = ckpt.load_file(OLD / f"{name}_epoch1.pt")
    old2 = ckpt.load_file(OLD / f"{name}_epoch2.pt")
    assert_weights_close(final_weights(fresh), old1["model"])

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD / f"{name}_epoch1.pt", resumed / "checkpoints" / "step-00000003.pt")
    shutil.copy(OLD / f"{name}_epoch1.pt.sha256", resumed / "checkpoints" / "step-00000003.pt.sha256")
    result = run(load_config(REPO / "configs" / "smoke.yaml", [*common, f"out_dir={resumed}", "train.epochs=2",
                                                               "train.resume=latest"]), DistContext())
    assert result["global_step"] == 6
    new2 = ckpt.load_file(ckpt.checkpoint_dir(resumed) / "last.pt")
    assert_weights_close(new2["model"], old2["model"])
    # What no kernel rounds: the schedule's position and every random stream's state.
    assert [g["lr"] for g in new2["optimizer"]["param_groups"]] == [g["lr"] for g in old2["optimizer"]["param_groups"]]
    assert_rng_equal(new2["rank_rng"], old2["rank_rng"])
    # And the old file rebuilds through the registry from its own stored config.
    model = build_model(old2["config"])
    model.load_state_dict(old2["model"])


def assert_weights_close(new: dict, old: dict) -> None:
    """Equal to within what another CPU's kernels make of three fp32 steps: up to 2.4e-4 (SepResNet's
    first conv, fresh epoch 1) with oneDNN and ATen held to AVX2 on the AVX-512 machine that wrote
    the files (0 there without the hold). A resume that drops the momentum, or runs the schedule
    one step off, moves a weight by more than 5e-4."""
    assert new.keys() == old.keys()
    for key in old:
        if old[key].is_floating_point():
            torch.testing.assert_close(new[key], old[key], rtol=0, atol=5e-4, msg=key)
        else:
            assert torch.equal(new[key], old[key]), key


def assert_rng_equal(new, old) -> None:
    if isinstance(old, torch.Tensor):
        assert torch.equal(new, old)
    elif isinstance(old, dict):
        assert new.keys() == old.keys()
        for key in old:
            assert_rng_equal(new[key], old[key])
    elif isinstance(old, (list, tuple)):
        assert len(new) == len(old)
        for a, b in zip(new, old):
            assert_rng_equal(a, b)
    else:
        assert new == old


@pytest.fixture
def one_thread():
    # CPU kernels sum in another order with another thread count: the old runs used one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ a user's network trains


def test_a_network_from_a_file_trains_and_its_checkpoint_names_the_reference(tmp_path: Path):
    result = train_in_process(tmp_path / "run", **{"model.name": EXAMPLE, "model.args.width": 8, "train.epochs": 1})
    assert result["epochs"] == 1 and 0 <= result["test_accuracy"] <= 1
    payload = ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "run") / "last.pt")
    assert payload["config"]["model"]["name"] == EXAMPLE and payload["config"]["model"]["args"] == {"width": 8}
    # Weights only, no code: every value is a tensor or plain data.
    assert all(isinstance(v, torch.Tensor) for v in payload["model"].values())
    model = resolve(EXAMPLE).builder(width=8)
    model.load_state_dict(payload["model"])
    # And it resumes: one more epoch from the file, its steps counted on.
    again = train_in_process(tmp_path / "run", **{"model.name": EXAMPLE, "model.args.width": 8, "train.epochs": 2,
                                                  "train.resume": "latest"})
    assert (again["epochs"], again["global_step"]) == (2, 12)


def test_a_network_from_a_package_on_the_path_trains(tmp_path: Path, monkeypatch):
    package = tmp_path / "usernets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "wide.py").write_text(textwrap.dedent("""
        from torch import nn

        class Wide(nn.Module):
            def __init__(self, channels=6, num_classes=10):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=2, dilation=2), nn.ReLU())
                self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

            def forward(self, x):
                return self.head(self.features(x))
    """))
    monkeypatch.chdir(tmp_path)   # a package in the current folder is importable, as with python -m
    result = train_in_process(tmp_path / "run", **{"model.name": "usernets.wide:Wide", "model.args.channels": 5,
                                                   "train.epochs": 1})
    assert result["epochs"] == 1
    weights = final_weights(tmp_path / "run")
    assert weights["features.0.weight"].shape == (5, 3, 3, 3)


@pytest.mark.slow
def test_a_network_from_a_file_trains_under_torchrun(tmp_path: Path):
    out = tmp_path / "run"
    user = {"model.name": EXAMPLE, "model.args.width": 8, "train.epochs": 1}
    # SyncBN has CUDA kernels only: on a CPU each rank says so in one line, before any data.
    refused = run_job(torchrun(2, tiny_overrides(out, **user, **{"train.sync_bn": "true"})))
    # (torchrun's agent reports a failed worker with a traceback of its own; the workers print none.)
    assert refused.returncode != 0 and "exitcode  : 2" in refused.stderr and "ValueError" not in refused.stderr
    # A rank says why in at most one line: the refusal, or - when torchrun stopped it after
    # the other's refusal, before it got as far - that another process of the job stopped
    # (one still importing torch when stopped says nothing). One of them refused.
    for rank in (0, 1):
        said = [line for line in refused.stderr.splitlines() if line.startswith(f"error: rank {rank}: ")]
        assert len(said) <= 1 and all("train.sync_bn=true needs CUDA GPUs" in line
                                      or "another process of the job stopped" in line for line in said), refused.stderr
    assert "train.sync_bn=true needs CUDA GPUs" in refused.stderr
    done = run_job(torchrun(2, tiny_overrides(out, **user)))
    assert done.returncode == 0, done.stderr
    final = [line for line in done.stdout.splitlines() if line.startswith("final: ")]
    assert len(final) == 1 and '"world_size": 2' in final[0]
    digests = final[0].split('"replica_digests": [')[1].split("]")[0].split(", ")
    assert len(digests) == 2 and digests[0] == digests[1]


# ------------------------------------------------------------------ every bad reference: one line


BROKEN_FILES = {
    "syntax.py": "class Net(:\n",
    "forward.py": "from torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                  "        self.fc = nn.Linear(100, 10)\n    def forward(self, x):\n        return self.fc(x)\n",
    "shape.py": "from torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                "        self.conv = nn.Conv2d(3, 10, 1)\n    def forward(self, x):\n        return self.conv(x)\n",
}


@pytest.mark.parametrize("reference, args, says", [
    ("syntax.py:Net", [], "importing 'syntax.py' failed (SyntaxError"),
    ("missing.py:Net", [], "the file 'missing.py' does not exist"),
    ("nosuch_package.nets:Net", [], "no module 'nosuch_package.nets' on sys.path"),
    (f"{EXAMPLE[:-len(':TinyNet')]}:TinyNett", [], "has no 'TinyNett'; the models it defines: TinyNet"),
    (f"{EXAMPLE[:-len(':TinyNet')]}:unit", [], "'unit' is a function, not an nn.Module subclass or a builder "
                                              "registered with @register_model"),
    (EXAMPLE, ["model.args.depth=3"], "model.args.depth is not an argument of"),
    ("forward.py:Net", [], "a forward pass on a 1x3x32x32 input fails (RuntimeError: mat1 and mat2"),
    ("shape.py:Net", [], "returns [1, 10, 32, 32] for a 1x3x32x32 input; it must return logits of shape "
                         "[N, num_classes] = [1, 10]"),
    ("seed", ["model.widths=[8,8]"], "seed takes 3 positive channel counts"),
])
def test_every_bad_reference_is_one_line_and_exit_2_before_any_data(tmp_path: Path, monkeypatch, capsys,
                                                                   reference, args, says):
    from cifar_ddp.launcher import run_training

    for name, text in BROKEN_FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    # The data root does not exist: had the data been loaded first, that would be the error.
    code = run_training(None, [f"model.name={reference}", *args, "data.source=folder", "data.root=nowhere",
                               f"out_dir={tmp_path / 'run'}", "train.progress_bar=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    if "depth" in says:
        assert "it takes: width=40, num_classes=10" in err[0]


# ------------------------------------------------------------------ the design rules


def _rule_net(kind: str) -> nn.Module:
    """TinyNet (which keeps every seed rule) changed to break exactly one rule."""
    m = example_module()
    unit, separable, w = m.unit, m.separable, 32
    net = m.TinyNet(width=w)
    if kind == "maxpool":
        net.c2 = nn.Sequential(*net.c2, nn.MaxPool2d(3, 1, 1))
    elif kind == "params":
        net = m.TinyNet(width=48)
    elif kind == "rf":
        net.c4 = nn.Sequential(separable(4 * w, 4 * w, dilation=2))
    elif kind == "no_dilation_c3":
        net.c3 = nn.Sequential(separable(3 * w, 3 * w), separable(3 * w, 4 * w, stride=2))
    elif kind == "no_depthwise_c1":
        net.c1 = nn.Sequential(unit(3, w), unit(w, 2 * w, dilation=2), unit(2 * w, 2 * w, stride=2))
    elif kind == "flatten_head":
        net.output = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 4 * 4, 10))
    return net


@pytest.mark.parametrize("kind, rule, says", [
    ("maxpool", "forbid", "MaxPool2d at c2.2: forbidden by rules.forbid [MaxPool2d]"),
    ("params", "max_params", "parameters 175,690 > rules.max_params 150,576"),
    ("rf", "min_receptive_field", "receptive field 77 < rules.min_receptive_field 91"),
    ("no_dilation_c3", "dilated_in", "c3: no conv with dilation > 1 (rules.dilated_in)"),
    ("no_depthwise_c1", "depthwise_separable_in", "c1: no depthwise conv (groups == in_channels > 1) followed by "
                                                  "a 1x1 conv"),
    ("flatten_head", "global_average_pooling", "the head does not average the map: the 4x4 map ends in Flatten "
                                               "output.0"),
])
def test_each_rule_is_broken_by_a_net_built_to_break_exactly_it(kind, rule, says):
    results = rules.check_rules(_rule_net(kind), SEED_RULES)
    broken = [r for r in results if not r.ok]
    assert [r.rule for r in broken] == [rule], [r.text for r in broken]
    assert says in broken[0].text


def test_a_compliant_net_and_both_builtin_nets_keep_every_seed_rule_with_measured_values():
    for model in (example_module().TinyNet(), build_model("seed"), build_model("sep_resnet")):
        results = rules.check_rules(model, SEED_RULES)
        assert len(results) == 10 and all(r.ok for r in results), [r.text for r in results if not r.ok]
        params = sum(p.numel() for p in model.parameters())
        rf = receptive_field(model).receptive_field
        assert results[0].text == f"parameters {params:,} <= rules.max_params 150,576"
        assert results[1].text == f"receptive field {rf} >= rules.min_receptive_field 91"
    seed_rf = rules.check_rules(build_model("seed"), SEED_RULES)[1].text
    assert seed_rf == "receptive field 91 >= rules.min_receptive_field 91"


def test_rules_limits_both_sides_of_the_line():
    model = build_model("seed")
    at = rules.check_rules(model, RulesConfig(max_params=150_576, min_receptive_field=91))
    over = rules.check_rules(model, RulesConfig(max_params=150_575, min_receptive_field=92))
    assert [r.ok for r in at] == [True, True] and [r.ok for r in over] == [False, False]
    assert over[0].text == "parameters 150,576 > rules.max_params 150,575"
    assert rules.check_rules(model, RulesConfig()) == []


def test_functional_max_pooling_and_blocks_out_of_order_are_caught():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Conv2d(3, 8, 3, padding=1)
            self.a = nn.Linear(8, 10)

        def forward(self, x):
            return self.a(nn.functional.max_pool2d(self.b(x), 32).flatten(1))

    results = rules.check_rules(Functional(), RulesConfig(forbid=["MaxPool2d"], blocks=["a", "b"],
                                                          global_average_pooling=True))
    assert [r.ok for r in results] == [False, False, False]
    assert "max_pool2d() in forward" in results[0].text
    assert "blocks out of order" in results[1].text and "the model's blocks: b, a" in results[1].text
    assert "ends in max_pool2d()" in results[2].text


def test_rules_file_is_included_and_overridable_and_dilated_all_means_every_block_but_the_head():
    cfg = load_config(REPO / "configs" / "seed.yaml", ["rules.max_params=100"])
    assert cfg.rules.max_params == 100 and cfg.rules.min_receptive_field == 91
    assert cfg.rules.dilated_in == ["all"] and cfg.rules.blocks[-1] == "output"
    results = rules.check_rules(build_model("seed"), cfg.rules)
    assert [r.text.split(":")[0] for r in results if r.rule == "dilated_in"] == ["c1", "c2", "c3", "c4"]
    with pytest.raises(ConfigError, match="rules file 'nope.yaml' does not exist"):
        load_config(None, ["rules=nope.yaml"])
    assert load_config(None, ["rules.forbid=MaxPool2d"]).rules.forbid == ["MaxPool2d"]


def _summary(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar_ddp.summary", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=job_env())


def test_summary_prints_one_line_per_rule_and_exits_2_when_one_is_broken():
    held = _summary("--config", "configs/seed.yaml", f"model.name={EXAMPLE}")
    assert held.returncode == 0, held.stderr
    assert "design rules: 10 of 10 hold" in held.stdout and "✘" not in held.stdout
    broken = _summary("--config", "configs/seed.yaml", f"model.name={EXAMPLE}", "model.args.width=48")
    assert broken.returncode == 2
    assert "design rules: 9 of 10 hold" in broken.stdout
    assert "  ✘ parameters 175,690 > rules.max_params 150,576" in broken.stdout


def test_training_stops_on_a_broken_rule_before_the_data_and_warns_when_not_enforced(tmp_path: Path, capsys):
    from cifar_ddp.launcher import run_training

    common = [f"model.name={EXAMPLE}", "model.args.width=48", "data.source=folder", "data.root=nowhere",
              f"out_dir={tmp_path / 'run'}"]
    assert run_training(str(REPO / "configs" / "seed.yaml"), common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "error: rule broken: parameters 175,690 > rules.max_params 150,576" and len(err) == 2
    # Not enforced: a warning, and the run goes on to the data (which then is missing).
    with pytest.warns(UserWarning, match="rule broken: parameters 175,690 > rules.max_params 150,576"):
        assert run_training(str(REPO / "configs" / "seed.yaml"), [*common, "rules.enforce=false"]) == 2
    assert "data.root 'nowhere' does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ checkpoints never run code nobody named


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("user") / "run"
    train_in_process(out, **{"model.name": EXAMPLE, "model.args.width": 8, "train.epochs": 1})
    return ckpt.checkpoint_dir(out) / "last.pt"


def _tool(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=180, env=job_env())


def test_a_user_model_checkpoint_evaluates_exports_and_predicts_only_with_the_reference_given(
        user_checkpoint: Path, tmp_path: Path):
    named = f"model.name={EXAMPLE}"
    refused = _tool("evaluate.py", "--checkpoint", str(user_checkpoint))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: checkpoint '{user_checkpoint}' was trained with the model '{EXAMPLE}', which is code outside "
        f"cifar_ddp; importing it runs that code: name it yourself with {named} (or --trust-model-code) if you "
        "trust it"]
    report = tmp_path / "report"
    evaluated = _tool("evaluate.py", "--checkpoint", str(user_checkpoint), named, "--json", "--report", str(report))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "- Grad-CAM layer: c4\n" in (report / "report.md").read_text()
    trusted = _tool("evaluate.py", "--checkpoint", str(user_checkpoint), "--trust-model-code", "--json")
    assert trusted.returncode == 0, trusted.stderr

    onnx = tmp_path / "tiny.onnx"
    assert _tool("export.py", "--checkpoint", str(user_checkpoint), "--format", "onnx", "--out", str(onnx)
                 ).returncode == 2 and not onnx.exists()
    exported = _tool("export.py", "--checkpoint", str(user_checkpoint), "--format", "onnx", "--out", str(onnx),
                     named, "--parity-images", "16")
    assert exported.returncode == 0, exported.stderr
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    assert _tool("predict.py", "--model", str(user_checkpoint), str(tmp_path / "red.png")).returncode == 2
    from_pt = _tool("predict.py", "--model", str(user_checkpoint), str(tmp_path / "red.png"), named, "--json")
    from_onnx = _tool("predict.py", "--model", str(onnx), str(tmp_path / "red.png"), "--json")
    assert from_pt.returncode == 0 and from_onnx.returncode == 0, from_pt.stderr + from_onnx.stderr
    import json
    top_pt, top_onnx = json.loads(from_pt.stdout)[0]["predictions"][0], json.loads(from_onnx.stdout)[0]["predictions"][0]
    assert top_pt["class"] == top_onnx["class"] and abs(top_pt["probability"] - top_onnx["probability"]) < 1e-3


@pytest.mark.parametrize("reference, args", [
    ("subprocess:run", {"args": ["touch", "{marker}"]}),
    ("os:system", {"command": "touch {marker}"}),
    ("builtins:exec", {"source": "open('{marker}', 'w')"}),
])
def test_a_crafted_checkpoint_never_runs_what_its_reference_names(user_checkpoint: Path, tmp_path: Path,
                                                                  reference, args):
    marker = tmp_path / "ran"
    payload = ckpt.load_file(user_checkpoint)
    payload["config"]["model"]["name"] = reference
    payload["config"]["model"]["args"] = {k: (v.format(marker=marker) if isinstance(v, str) else
                                              [a.format(marker=marker) for a in v]) for k, v in args.items()}
    crafted = tmp_path / "crafted.pt"
    ckpt.write_file(crafted, ckpt.encode(payload))
    for extra in ([], ["--trust-model-code"], [f"model.name={reference}"]):
        done = _tool("evaluate.py", "--checkpoint", str(crafted), *extra)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not marker.exists()
    # Even asked directly with trust, the reference resolves to something that is not a model.
    with pytest.raises(ConfigError, match="not an nn.Module subclass"):
        build_model(payload["config"], trust_model_code=True)
    assert not marker.exists()


def test_a_checkpoint_naming_a_file_does_not_import_it_unless_named(user_checkpoint: Path, tmp_path: Path):
    marker = tmp_path / "imported"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\nfrom torch import nn\nclass Net(nn.Module):\n    pass\n")
    payload = ckpt.load_file(user_checkpoint)
    payload["config"]["model"].update(name=f"{evil}:Net", args={})
    crafted = tmp_path / "crafted.pt"
    ckpt.write_file(crafted, ckpt.encode(payload))
    for run in (lambda: _tool("evaluate.py", "--checkpoint", str(crafted)),
                lambda: _tool("export.py", "--checkpoint", str(crafted), "--format", "onnx"),
                lambda: _tool("predict.py", "--model", str(crafted), str(REPO / "docs" / "understand" / "curves.png"))):
        done = run()
        assert done.returncode == 2 and "name it yourself" in done.stderr, done.stderr
        assert not marker.exists()
    with pytest.raises(ConfigError, match="name it yourself"):
        build_model(payload["config"])
    assert not marker.exists()


def test_lr_find_runs_on_a_user_model(tmp_path: Path):
    from cifar_ddp.lr_find import lr_range_test

    cfg = load_config(None, tiny_overrides(tmp_path, **{"model.name": EXAMPLE, "model.args.width": 8}))
    result = lr_range_test(cfg, DistContext(), steps=6, start=1e-4, end=1.0)
    assert len(result.lrs) == 6 and result.lrs[0] == pytest.approx(1e-4)


def test_a_depthwise_conv_followed_by_a_3x3_conv_is_not_separable():
    m = example_module()
    net = m.TinyNet(width=32)
    # c1's depthwise conv now feeds a 3x3 conv: a "separable" pair without the pointwise half.
    net.c1 = nn.Sequential(m.unit(3, 32), m.unit(32, 32, dilation=2, groups=32), m.unit(32, 64),
                           m.unit(64, 64, stride=2))
    results = rules.check_rules(net, RulesConfig(depthwise_separable_in=["c1"]))
    assert not results[0].ok
    assert "depthwise conv c1.1.0 is followed by a 3x3 conv c1.2.0" in results[0].text


def test_a_config_dict_may_name_a_rules_file_and_override_one_rule(monkeypatch):
    from cifar_ddp.config import config_from_dict

    monkeypatch.chdir(REPO)
    cfg = config_from_dict({"rules": "configs/rules/seed.yaml"}, ["rules.max_params=5"])
    assert (cfg.rules.max_params, cfg.rules.min_receptive_field, cfg.rules.forbid) == (5, 91, ["MaxPool2d"])


def test_a_plain_dilated_depthwise_conv_is_named_with_the_block_that_replaces_it(tmp_path: Path):
    from cifar_ddp.models import plain_dilated_depthwise

    m = example_module()
    assert plain_dilated_depthwise(m.TinyNet()) == []          # built with DepthwiseConv2d
    net = m.TinyNet(width=8)
    net.c2[0][0] = nn.Sequential(nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False),
                                 nn.BatchNorm2d(16), nn.ReLU())
    net.c3[0][0][0] = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)   # undilated: fine
    assert plain_dilated_depthwise(net) == ["c2.0.0.0"]
    (tmp_path / "plain.py").write_text(textwrap.dedent(f"""
        import sys
        from torch import nn
        sys.path.insert(0, {str(REPO / 'examples')!r})
        from tiny_net import TinyNet

        class Plain(TinyNet):
            def __init__(self, num_classes=10):
                super().__init__(width=8, num_classes=num_classes)
                self.c2[0][0] = nn.Sequential(nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False),
                                              nn.BatchNorm2d(16), nn.ReLU())
    """))
    with pytest.warns(UserWarning, match="c2.0.0.0 is a dilated depthwise nn.Conv2d: on a CPU torch runs it "
                                         "4-20x slower.*; build it with cifar_ddp.models.blocks.DepthwiseConv2d"):
        train_in_process(tmp_path / "run", **{"model.name": f"{tmp_path}/plain.py:Plain", "train.epochs": 1,
                                              "train.precision": "fp32"})
