"""Typed run configuration: YAML file + dotted command-line overrides, validated.

Every setting lives in one of the dataclasses below, with its default. A YAML
file only lists what differs from the defaults. Validation happens before any
work starts: an unknown key, a wrong type or an impossible value stops with a
message naming the key, what was expected and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Tuple

import yaml

from .errors import ConfigError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


@dataclass
class DataConfig:
    source: Literal["cifar10", "folder", "fake"] = "cifar10"
    root: str = "data/cifar10"
    # cifar10 only: fetch the official archive when it is not in root yet.
    download: bool = True
    # fake only: images per split.
    fake_size: int = 512
    # folder only: where decoded arrays are cached; "" means <root>/.cifar_ddp_cache.
    cache_dir: str = ""
    # Images carved from the training split to compare recipes without looking at
    # the test split; 0 evaluates on the test split.
    val_size: int = 0
    # Which images the carve takes. Kept apart from `seed` so that runs with other
    # seeds are scored on the same images and their spread is training noise only.
    val_seed: int = 0
    # DataLoader worker processes (albumentations backend only).
    num_workers: int = 2


@dataclass
class AugmentConfig:
    # "tensor": batched on the training device; "albumentations": per image in workers.
    backend: Literal["tensor", "albumentations"] = "tensor"
    hflip_p: float = 0.5
    # "random": each image flipped with p=hflip_p, drawn afresh every epoch. "alternate"
    # (airbench): a fixed random half of the images, drawn from `seed` by image index,
    # is flipped on even epochs (counted from 0) and the other half on odd ones, so every
    # image is seen both ways every two epochs; tensor backend, hflip_p left at 0.5.
    flip: Literal["random", "alternate"] = "random"
    # Shift-scale-rotate, with albumentations' ShiftScaleRotate defaults.
    affine_p: float = 0.5
    shift_limit: float = 0.0625
    scale_limit: float = 0.1
    rotate_limit: float = 45.0
    # Reflect (not black) borders: ShiftScaleRotate's 1.x default, which the seed
    # trained with; black borders are an artefact the net would learn to ignore.
    border_mode: Literal["reflect", "constant"] = "reflect"
    # Random crop of the image padded by crop_padding pixels (torchvision's CIFAR
    # RandomCrop(32, padding=4)): a whole-pixel shift, so unlike the affine step it
    # never blurs the image by resampling. Off in the seed's recipe. Borders as above.
    crop_p: float = 0.0
    crop_padding: int = 4
    cutout_p: float = 0.5
    cutout_size: int = 16
    # Epochs at the end trained without augmentation (0 keeps it to the end).
    plain_last_epochs: int = 0
    # Mixup / CutMix between the images of one batch (tensor backend; data/mixing.py), as
    # torchvision.transforms.v2.MixUp / CutMix do: Beta(alpha, alpha) shares, the batch mixed
    # with itself rolled by one. 0 = off. The targets become soft labels.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Probability that a batch is mixed at all; with both on, the probability that a mixed
    # batch takes CutMix rather than mixup.
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    # Ramp: in epoch e (from 0) the partner image's share 1 - lam is multiplied by
    # min(1, (e + 1) / mix_ramp_epochs) (a CutMix box shrinks to match); 0 = full strength at once.
    mix_ramp_epochs: int = 0


@dataclass
class ModelConfig:
    # A registered name (cifar_ddp.models.registered_names()) or a reference to the user's
    # own network: path/to/file.py:ClassName or package.module:ClassName.
    name: str = "seed"
    # Keyword arguments for the network's constructor (or builder function).
    args: Dict[str, Any] = field(default_factory=dict)
    # The built-in models' settings; each goes to the builder argument of the same name,
    # for any network that has one. Channel widths: empty means the model's own defaults.
    widths: List[int] = field(default_factory=list)
    dropout: float = 0.05
    num_classes: int = 10
    # Models with residual units only: start every residual unit as the identity (its last
    # BN's gain at 0, as torchvision's ResNet `zero_init_residual`).
    zero_init_residual: bool = False
    # Set on every BatchNorm of the built network (user networks included), in PyTorch's
    # sense: the weight of the new batch in the running statistics (airbench's 0.6 "kept"
    # is 0.4 here). 0 = each BatchNorm keeps its own (PyTorch's default 0.1).
    bn_momentum: float = 0.0
    # How the network's dilated depthwise convs (models.blocks.DepthwiseConv2d) run: "native"
    # (torch's dilated kernel), "spread" (an undilated conv over the spread-out kernel), or
    # "auto" (spread on a CPU, native elsewhere: blocks.AUTO_DILATED_DEPTHWISE). Same weights.
    dilated_depthwise: Literal["auto", "native", "spread"] = "auto"
    # The seed and SepResNet: start C1 with airbench's frozen patch-whitening stem (a 2x2 conv,
    # 3 -> 24 channels, 32x32 -> 31x31, then GELU; models/whitening.py), its filters computed
    # from the training split (after the val carve) before training; +312 frozen parameters.
    # The seed's first conv then reads 24 channels instead of 3 (153,912 in all, over its
    # budget); SepResNet's becomes depthwise-separable (148,314).
    whiten_stem: bool = False


@dataclass
class RulesConfig:
    """Design rules the network must keep (cifar_ddp/rules.py checks them). Empty = no rule."""
    # Most parameters allowed (0 = no limit).
    max_params: int = 0
    # Smallest receptive field allowed, in input pixels (0 = no limit).
    min_receptive_field: int = 0
    # Module types that must not appear, by class name (e.g. [MaxPool2d]); the functional
    # form (F.max_pool2d) counts too.
    forbid: List[str] = field(default_factory=list)
    # Top-level child modules that must exist, in this order (e.g. [c1, c2, c3, c4, output]).
    blocks: List[str] = field(default_factory=list)
    # Blocks holding a depthwise conv (groups == in_channels > 1) followed by a 1x1 conv.
    depthwise_separable_in: List[str] = field(default_factory=list)
    # Blocks holding a conv with dilation > 1; [all] = every block of `blocks` but the last (the head).
    dilated_in: List[str] = field(default_factory=list)
    # The head averages the whole feature map (global average pooling), no flatten of a map.
    global_average_pooling: bool = False
    # false: a broken rule is a warning, and training goes on.
    enforce: bool = True


@dataclass
class TrainConfig:
    epochs: int = 24
    # Per process; the global batch is batch_size x world size.
    batch_size: int = 256
    # muon: torch.optim.Muon for the dense and pointwise (1x1) conv weights, flattened to
    # 2-D, and SGD (momentum, nesterov, weight_decay below) for everything else: depthwise
    # convs, BatchNorm, biases, the linear head (optim.MuonWithSGD).
    optimizer: Literal["sgd", "adamw", "muon"] = "sgd"
    # muon only: Muon's peak LR (not scaled with the batch), on the same schedule as `lr`,
    # and its momentum (Nesterov). Its weight decay is `weight_decay`, decoupled (x lr).
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    # Peak learning rate for a global batch of `lr_reference_batch`; it is
    # scaled linearly with the real global batch.
    lr: float = 0.2
    lr_reference_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    # Clip the gradients' total L2 norm to this (torch.nn.utils.clip_grad_norm_), inside the
    # step on the device; 0 = off.
    clip_grad_norm: float = 0.0
    # Learning-rate multiplier for BatchNorm biases (airbench: 64, with the gains frozen);
    # bn_freeze_weight keeps every BatchNorm gain at its initial value (not trained).
    bn_bias_lr_mult: float = 1.0
    bn_freeze_weight: bool = False
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    # onecycle: linear warm-up over warmup_frac of the steps from lr/initial_div to lr, then
    # cosine down to lr/final_div; cosine: no warm-up, cosine from lr down to lr/final_div
    # (warmup_frac and initial_div unused); constant: lr throughout.
    warmup_frac: float = 0.25
    initial_div: float = 25.0
    final_div: float = 1e4
    # Exponential moving average of weights, evaluated instead of the raw weights; 0 = off.
    ema_decay: float = 0.0
    # Lookahead (airbench; ema.Lookahead): every this many steps (k) an average of the weights
    # moves towards the model, keeping lookahead_decay**k x (step / total steps)**3 of itself,
    # and the model continues from that average; the last step copies it into the model.
    # 0 = off. It composes with ema_decay: the EMA averages the model as the lookahead leaves it.
    lookahead_every_steps: int = 0
    lookahead_decay: float = 0.95
    # Evaluate on image and its mirror, averaging logits (reported next to plain accuracy).
    tta_flip: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True
    sync_bn: bool = False
    # "" starts fresh; "latest" (--resume) continues from the newest good checkpoint in
    # out_dir/checkpoints and stops if there is none; "auto" (what a torchrun restart uses)
    # does the same but starts fresh when there is none; anything else is a checkpoint path.
    resume: str = ""
    checkpoint_every_steps: int = 0
    # End this invocation once this many steps are done in total (0 = never), with a
    # checkpoint and exit status 75, as if preempted: for time-sliced cluster jobs.
    stop_after_steps: int = 0
    keep_checkpoints: int = 2
    # TensorBoard pictures (confusion matrix, most confident mistakes, per-class PR curves)
    # after the last epoch, and also every this many epochs (0 = the last only) - of the
    # epochs that are scored (see eval_every_epochs).
    figures_every_epochs: int = 0
    # Write TensorBoard events (tensorboard/: scalars, pictures, hparams); false: none,
    # and torch.utils.tensorboard is never imported - the console, training_log.md and
    # the final line are the same. Speed recipes turn it off.
    tensorboard: bool = True
    # Draw the end-of-run pictures: curves.png and (with tensorboard) the TensorBoard
    # figures above; false: neither, and matplotlib is never imported during the run
    # (`cifar-ddp evaluate --report` draws the confusion matrix, mistakes and Grad-CAM
    # from the checkpoint afterwards; the curves' numbers are in training_log.md).
    figures: bool = True
    # Evaluate every this many epochs, and always after the last one (speed recipes: a
    # large number, so only the end is evaluated; best.pt is then the last evaluated).
    eval_every_epochs: int = 1
    # cuDNN autotuning (CUDA only): the first steps try every convolution algorithm for
    # the run's shapes (seconds of set-up), then run the fastest. False: cuDNN's
    # heuristic pick, no tuning (benchmarks/gpu_check.sh measures both).
    cudnn_benchmark: bool = True
    # With cudnn_benchmark: how many algorithms cuDNN tries per convolution (PyTorch's
    # torch.backends.cudnn.benchmark_limit; 0 = all of them). Fewer: a shorter first step,
    # perhaps a slower kernel kept (benchmarks/gpu_check.sh issue29 measures 1, 10 and 0).
    cudnn_benchmark_limit: int = 10
    # What a NaN/Inf loss does: stop the run, or skip the step and carry on.
    # Either way the bad update is never applied (it is masked on the device); the
    # decision is read at the next sync step (see log_every_steps).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # The host reads the device only every this many steps (and at epoch ends and
    # checkpoint steps): the step loss is logged, and a signal, a non-finite loss or
    # stop_after_steps is acted on. A stop lands at most this many steps late.
    log_every_steps: int = 50
    # torch.compile (inductor) the model's forward and backward. The first step pays for
    # compiling (reported apart from training time).
    compile: bool = False
    # CUDA only: capture the whole step (forward, loss, backward, all-reduce, optimizer,
    # EMA, metrics) as one CUDA graph after a few eager warm-up steps, and replay it.
    # "auto": on where it can run (a CUDA device, precision not fp16), off elsewhere, so
    # one config is fast on a GPU and still runs on a CPU.
    cuda_graph: Literal[False, True, "auto"] = False
    progress_bar: bool = True


@dataclass
class Config:
    seed: int = 0
    out_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # A mapping, or in a YAML file the path of a YAML file holding one (relative to the
    # config file), e.g. `rules: rules/seed.yaml`.
    rules: RulesConfig = field(default_factory=RulesConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (dict, Dict):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key '{key}' is {value!r}; expected a mapping of names to values, "
                              f"e.g. {key}: {{width: 24}} (or {key}.width=24 on the command line)")
        return copy.deepcopy(value)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # Same type too: 1 == True, but `1` is not a valid value for a true/false/"auto" key.
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise ConfigError(f"config key '{key}' is {value!r}; expected {_type_name(tp)}")
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        if inner is str and isinstance(value, str):
            value = [value]   # `forbid: MaxPool2d` means the list of that one name
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' is {value!r}; expected {_type_name(tp)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {sorted(_fields(tp))}, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    # bool is an int subclass: never let `true` pass for an int or 1 for a bool.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads 1e-3 and 5e-4 as strings: it wants 1.0e-3. Nobody means a string.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"config key '{key}' is {value!r} ({type(value).__name__}); expected {_type_name(tp)}"
    )


def _fields(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, values: Dict[str, Any], prefix: str = "") -> Any:
    fields = _fields(cls)
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}';{_did_you_mean(prefix, str(unknown[0]), fields)} allowed keys "
            f"under '{prefix.rstrip('.') or '<top level>'}' are: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(values[name], fields[name], prefix + name) for name in values}
    return cls(**kwargs)


def _did_you_mean(prefix: str, name: str, fields: Dict[str, Any]) -> str:
    """' did you mean 'train.epochs'?' for a misspelt key: the nearest key of its own section,
    else a key of that name in another section (`epochs=3` for train.epochs), else ''."""
    near = difflib.get_close_matches(name, fields, n=1)
    if near:
        return f" did you mean '{prefix}{near[0]}'?"
    if not prefix:
        elsewhere = [f"{section}.{name}" for section, tp in fields.items()
                     if dataclasses.is_dataclass(tp) and name in _fields(tp)]
        if elsewhere:
            return f" did you mean '{elsewhere[0]}'?"
    return ""


def _parse_override(text: str) -> Tuple[List[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value, e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has no key before '='")
    # YAML gives "10" -> 10, "true" -> True, "[1,2]" -> list, "auto" -> "auto".
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(tree: Dict[str, Any], path: List[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps
    the last silently, so a setting written twice would be decided by its position)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: the problem and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def packaged_configs_dir() -> Path:
    """The configs that ship with cifar_ddp. An installed wheel holds them inside the package
    (setup.cfg maps the checkout's configs/ to cifar_ddp/configs); run from a checkout (an
    editable install, launch/*.py) they are the checkout's configs/ beside the package."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def packaged_config_names() -> List[str]:
    return sorted(p.stem for p in packaged_configs_dir().glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A bare name (no folder, no suffix: `seed`) is the packaged config of that name, so
    that `--config seed` works from any folder; anything else is a path, as given."""
    text = str(path)
    if "/" not in text and os.sep not in text and not Path(text).suffix:
        packaged = packaged_configs_dir() / f"{text}.yaml"
        if packaged.is_file():
            return packaged
    return Path(path)


def load_config(path: str | Path | None = None, overrides: List[str] | None = None) -> Config:
    """Defaults <- YAML file (a path, or a packaged config's name) <- dotted overrides, then validated."""
    tree: Dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        if path.is_dir():
            raise ConfigError(f"config file '{path}' is a folder; pass a YAML file in it, e.g. configs/seed.yaml")
        if not path.is_file():
            names = packaged_config_names()
            near = difflib.get_close_matches(str(path), names, n=1)
            raise ConfigError(f"config file '{path}' does not exist;{f' did you mean {near[0]}?' if near else ''} "
                              f"pass an existing YAML file or the name of a packaged config: {', '.join(names)} "
                              "(`cifar-ddp configs` says what each is for)")
        loaded = _read_mapping(path, "config file", "at the top level")
        if loaded is None:
            warnings.warn(f"config file '{path}' is empty: the defaults are used, with the overrides given",
                          stacklevel=2)
        tree = loaded or {}
        _include_rules(tree, path.parent)
    return config_from_dict(tree, overrides)


def _read_mapping(path: Path, what: str, where: str) -> Dict[str, Any] | None:
    """The YAML mapping in `path` (None for an empty file); keys given twice are an error."""
    try:
        loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {_yaml_problem(exc)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping {where}")
    return loaded


def _include_rules(tree: Dict[str, Any], base: Path) -> None:
    """`rules: rules/seed.yaml` stands for the mapping in that file (relative to `base`,
    the folder of the config that names it), so that one file states a set of rules and
    every config that keeps them names it."""
    name = tree.get("rules")
    if not isinstance(name, str):
        return
    path = Path(name) if Path(name).is_absolute() else base / name
    if not path.is_file():
        raise ConfigError(f"rules file '{name}' does not exist (looked for {path}); give a YAML file of "
                          "rules (e.g. configs/rules/seed.yaml) or a mapping under rules:")
    tree["rules"] = _read_mapping(path, "rules file", "of rules, e.g. max_params: 150576") or {}


def config_from_dict(tree: Dict[str, Any], overrides: List[str] | None = None) -> Config:
    """Build a Config from a nested dict (e.g. `Config.to_dict` saved in a checkpoint)."""
    tree = copy.deepcopy(tree)
    _include_rules(tree, Path.cwd())
    for text in overrides or []:
        keys, value = _parse_override(text)
        _set_dotted(tree, keys, value)
        _include_rules(tree, Path.cwd())   # rules=PATH on the command line
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Reject values that type-check but cannot work."""
    d, a, m, t = cfg.data, cfg.augment, cfg.model, cfg.train
    _require(t.epochs >= 1, f"train.epochs is {t.epochs}; it must be at least 1")
    _require(t.batch_size >= 1, f"train.batch_size is {t.batch_size}; it must be at least 1 (it is per process)")
    _require(t.lr > 0, f"train.lr is {t.lr}; it must be positive")
    _require(t.lr_reference_batch >= 1, "train.lr_reference_batch must be at least 1")
    _require(0 <= t.warmup_frac < 1, f"train.warmup_frac is {t.warmup_frac}; it must be in [0, 1)")
    _require(t.initial_div >= 1 and t.final_div >= 1, "train.initial_div and train.final_div must be >= 1")
    _require(0 <= t.ema_decay < 1, f"train.ema_decay is {t.ema_decay}; it must be in [0, 1) (0 turns EMA off)")
    _require(t.lookahead_every_steps >= 0, f"train.lookahead_every_steps is {t.lookahead_every_steps}; it must be "
                                           ">= 0 (0 turns the lookahead off)")
    _require(0 < t.lookahead_decay <= 1, f"train.lookahead_decay is {t.lookahead_decay}; it must be in (0, 1]")
    _require(0 <= t.label_smoothing < 1, f"train.label_smoothing is {t.label_smoothing}; it must be in [0, 1)")
    _require(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    # Every optimizer argument is checked here: torch's own ValueError would be a traceback.
    _require(0 <= t.momentum < 1, f"train.momentum is {t.momentum}; it must be in [0, 1) (0: plain SGD)")
    _require(t.muon_lr > 0, f"train.muon_lr is {t.muon_lr}; it must be positive")
    _require(0 <= t.muon_momentum < 1, f"train.muon_momentum is {t.muon_momentum}; it must be in [0, 1)")
    _require(not (t.nesterov and t.optimizer in ("sgd", "muon") and t.momentum <= 0),
             "train.nesterov=true needs train.momentum > 0; set one or the other")
    _require(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0 (0 = only at epoch ends)")
    _require(t.stop_after_steps >= 0, "train.stop_after_steps must be >= 0 (0 = run to the end)")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1")
    _require(t.figures_every_epochs >= 0, "train.figures_every_epochs must be >= 0 (0: after the last epoch only)")
    _require(t.cudnn_benchmark_limit >= 0, "train.cudnn_benchmark_limit must be >= 0 (0 tries every "
             "algorithm; PyTorch's default is 10)")
    _require(t.eval_every_epochs >= 1, "train.eval_every_epochs must be at least 1 (1: after every epoch; the last "
                                       "epoch is always evaluated)")
    _require(t.log_every_steps >= 1, "train.log_every_steps must be at least 1")
    for name in ("hflip_p", "affine_p", "crop_p", "cutout_p"):
        p = getattr(a, name)
        _require(0 <= p <= 1, f"augment.{name} is {p}; a probability must be in [0, 1]")
    _require(0 <= a.shift_limit < 1, "augment.shift_limit is a fraction of the image size in [0, 1)")
    _require(0 <= a.scale_limit < 1, "augment.scale_limit must be in [0, 1)")
    _require(0 <= a.rotate_limit <= 180, "augment.rotate_limit is in degrees, within [0, 180]")
    _require(0 <= a.crop_padding <= 16, f"augment.crop_padding is {a.crop_padding}; it is in pixels, within [0, 16]")
    _require(1 <= a.cutout_size <= 32, f"augment.cutout_size is {a.cutout_size}; it must fit a 32x32 image (1..32)")
    _require(0 <= a.plain_last_epochs <= t.epochs, "augment.plain_last_epochs must be within [0, train.epochs]")
    for name in ("mixup_alpha", "cutmix_alpha"):
        _require(getattr(a, name) >= 0, f"augment.{name} is {getattr(a, name)}; it must be >= 0 (0 turns it off)")
    for name in ("mix_prob", "mix_switch_prob"):
        p = getattr(a, name)
        _require(0 <= p <= 1, f"augment.{name} is {p}; a probability must be in [0, 1]")
    _require(a.mix_ramp_epochs >= 0, "augment.mix_ramp_epochs must be >= 0 (0 = full strength from the start)")
    mixing = a.mixup_alpha > 0 or a.cutmix_alpha > 0
    for what, used in (("augment.mixup_alpha/cutmix_alpha", mixing), ("augment.flip=alternate", a.flip == "alternate")):
        _require(not used or a.backend == "tensor", f"{what} needs augment.backend=tensor (the batched pipeline)")
    _require(a.flip != "alternate" or a.hflip_p == 0.5,
             f"augment.flip=alternate flips half the images each epoch by itself; leave augment.hflip_p at 0.5 "
             f"(it is {a.hflip_p}), or use augment.flip=random")
    _require(t.clip_grad_norm >= 0, f"train.clip_grad_norm is {t.clip_grad_norm}; it must be >= 0 (0 turns it off)")
    _require(t.bn_bias_lr_mult > 0, f"train.bn_bias_lr_mult is {t.bn_bias_lr_mult}; it must be positive (1: no change)")
    _require(not (t.bn_freeze_weight and m.zero_init_residual),
             "train.bn_freeze_weight=true would keep model.zero_init_residual's zero gains at 0 (the residual "
             "branches would never learn); turn one of them off")
    _require(0 <= m.bn_momentum <= 1, f"model.bn_momentum is {m.bn_momentum}; it must be in (0, 1], or 0 to keep "
                                      "each BatchNorm's own")
    # What a model's widths and arguments may be is the model's business (models.build_model).
    _require(bool(m.name), "model.name is empty; name a registered model (e.g. seed) or path/to/file.py:ClassName")
    _require(0 <= m.dropout < 1, f"model.dropout is {m.dropout}; it must be in [0, 1)")
    _require(m.num_classes >= 2, "model.num_classes must be at least 2")
    _require(d.fake_size >= 1, "data.fake_size must be at least 1")
    _require(d.val_size >= 0, "data.val_size must be >= 0")
    _require(d.num_workers >= 0, "data.num_workers must be >= 0")
    _require(bool(cfg.out_dir), "out_dir must not be empty")
    r = cfg.rules
    _require(r.max_params >= 0, "rules.max_params must be >= 0 (0 = no limit)")
    _require(r.min_receptive_field >= 0, "rules.min_receptive_field must be >= 0 (0 = no limit)")
    _require("all" not in r.dilated_in or (r.dilated_in == ["all"] and len(r.blocks) >= 2),
             "rules.dilated_in: [all] stands alone and needs rules.blocks (every block but the last, the head)")
    for key in ("depthwise_separable_in", "dilated_in"):
        outside = [b for b in getattr(r, key) if b != "all" and r.blocks and b not in r.blocks]
        _require(not outside, f"rules.{key} names '{outside[0] if outside else ''}', which is not in rules.blocks "
                              f"{r.blocks}")
