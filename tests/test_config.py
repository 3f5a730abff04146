from pathlib import Path

import pytest

from cifar_ddp.config import Config, config_from_dict, load_config
from cifar_ddp.errors import ConfigError

from conftest import REPO


def test_defaults_then_file_then_overrides():
    cfg = load_config(REPO / "configs" / "seed.yaml", ["train.epochs=3", "data.source=fake", "train.lr=0.05"])
    assert cfg.train.epochs == 3 and cfg.data.source == "fake" and cfg.train.lr == 0.05
    # From the file alone (the default is no rule), through its rules: rules/seed.yaml.
    assert cfg.model.name == "seed" and cfg.rules.min_receptive_field == 91


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    assert isinstance(load_config(REPO / "configs" / name), Config)


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_cuda_graph_takes_true_false_or_auto(value, expected):
    got = load_config(None, [f"train.cuda_graph={value}"]).train.cuda_graph
    assert got == expected and type(got) is type(expected)


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epoch=3"])
    message = str(err.value)
    assert "train.epoch" in message and "epochs" in message and "batch_size" in message


def test_unknown_section_in_yaml(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        load_config(path)


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=ten", "expected int"),
    ("train.epochs=2.5", "expected int"),
    ("train.channels_last=1", "expected bool"),
    ("train.precision=fp8", "one of 'auto', 'bf16', 'fp16', 'fp32'"),
    ("train.cuda_graph=1", "one of False, True, 'auto'"),     # 1 == True, but not a bool
    ("model.widths=16", "expected list of int"),
    ("train.lr=fast", "expected float"),
])
def test_wrong_types_name_key_and_type(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override.split("=")[0] in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("augment.cutout_p=1.5", "augment.cutout_p"),
    ("augment.crop_p=-0.1", "augment.crop_p"),
    ("augment.crop_padding=40", "augment.crop_padding"),
    ("train.warmup_frac=1", "train.warmup_frac"),      # lr_at would divide by zero
    ("train.label_smoothing=1", "train.label_smoothing"),
    ("train.ema_decay=1", "train.ema_decay"),
    ("augment.cutout_size=33", "augment.cutout_size"),
    ("augment.rotate_limit=181", "augment.rotate_limit"),
    ("model.dropout=1", "model.dropout"),
    ("model.num_classes=1", "model.num_classes"),
    ("train.log_every_steps=0", "train.log_every_steps"),
])
def test_impossible_values_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_exponent_floats_without_a_dot_are_floats(tmp_path: Path):
    # PyYAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`); users write it anyway.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  weight_decay: 5e-4\n")
    cfg = load_config(path, ["train.lr=2e-1"])
    assert cfg.train.weight_decay == 5e-4 and cfg.train.lr == 0.2


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


def test_round_trip_through_dict():
    cfg = load_config(None, ["train.epochs=7", "model.dropout=0.2"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_a_folder_given_as_config_is_named_as_a_folder(tmp_path: Path):
    with pytest.raises(ConfigError, match="is a folder; pass a YAML file"):
        load_config(tmp_path)


def test_every_optimizer_argument_is_checked_before_torch_sees_it():
    # torch.optim.SGD's own ValueError ("Invalid momentum value") would be a traceback.
    for momentum in ("-0.5", "1"):
        with pytest.raises(ConfigError, match=rf"train.momentum is {float(momentum)}; it must be in \[0, 1\)"):
            load_config(None, [f"train.momentum={momentum}", "train.nesterov=false"])
    assert load_config(None, ["train.momentum=0", "train.nesterov=false"]).train.momentum == 0


@pytest.mark.parametrize("text, message", [
    ("train:\n  epochs: 3\n  epochs: 4\n", r"not valid YAML: key 'epochs' is given twice at line 3, column 3$"),
    ("train:\n  epochs: [3\n", r"not valid YAML: .* at line \d+, column \d+$"),
    ("train: {epochs: 3, epochs: 3}\n", "key 'epochs' is given twice"),
])
def test_a_duplicate_key_or_invalid_yaml_is_one_line(tmp_path: Path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_an_empty_config_file_says_the_defaults_are_used(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    with pytest.warns(UserWarning, match="is empty: the defaults are used"):
        cfg = load_config(path, ["train.epochs=3"])
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 256


def test_an_override_value_may_itself_hold_an_equals_sign():
    # Only the first '=' separates key and value.
    assert load_config(None, ["out_dir=runs/lr=0.1"]).out_dir == "runs/lr=0.1"


@pytest.mark.parametrize("override", ["train.final_div=0.5", "train.initial_div=0.5"])
def test_each_lr_divisor_below_one_is_refused(override):
    with pytest.raises(ConfigError, match="train.initial_div and train.final_div must be >= 1"):
        load_config(None, [override])
    load_config(None, [override.replace("0.5", "1.0")])   # exactly 1 is fine
