"""The `cifar-ddp` command and its subcommands: every parser of the project's entry points.

    cifar-ddp train --config smoke out_dir=runs/smoke       (= python -m cifar_ddp train ...)
    torchrun --nproc_per_node 2 -m cifar_ddp train --config seed

launch/train.py, evaluate.py, export.py, predict.py, lr_find.py and `python -m
cifar_ddp.summary` are the same subcommands under their older names (they call `run`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import __version__

TRAIN = """Train a cifar_ddp model. The same command runs under all launchers:

    cifar-ddp train --config seed train.epochs=10
    torchrun --nproc_per_node 2 -m cifar_ddp train --config seed
    torchrun --nproc_per_node 2 launch/train.py --config configs/seed.yaml
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/train.py --config seed

--config is a packaged config's name (`cifar-ddp configs` lists them), a YAML file, or the
config.json a run saved in its out_dir (to run that recipe again). --print-config shows the
whole config that would run, defaults included, and exits.

Exit status: 0 done, 2 bad config/data/checkpoint (message on stderr),
75 stopped by SIGTERM, SIGINT or SIGUSR1 (SLURM's warning before the time limit) or by
train.stop_after_steps, after writing a checkpoint (resume it with --resume; a requeued
job script uses train.resume=auto, which starts afresh when out_dir holds no checkpoint).
"""

EVALUATE = """Evaluate a checkpoint on the test split of the configured data (on the validation
carve, "val", when the checkpoint's config has data.val_size > 0).

    cifar-ddp evaluate --checkpoint runs/fast85/checkpoints/best.pt
    cifar-ddp evaluate --checkpoint CKPT data.source=folder data.root=DIR --json
    cifar-ddp evaluate --checkpoint CKPT --report runs/fast85/report --tta

The run's own config (stored in the checkpoint) is the starting point; dotted
overrides change it, e.g. to point at another copy of the data. DIR may hold
only a test/ tree: normalization uses the statistics saved with the checkpoint.
Also runs under torchrun; the metrics are exact for any number of processes.
"""

EXPORT = """Export a checkpoint's model to ONNX, TorchScript or safetensors, and check it against PyTorch.

    cifar-ddp export --checkpoint runs/fast85/checkpoints/best.pt --format onnx
    cifar-ddp export --checkpoint CKPT --format torchscript --out model.ts data.root=DIR
    cifar-ddp export --checkpoint CKPT --format safetensors --out runs/fast85/hub

The ONNX and TorchScript models take float RGB images in [0, 1], NCHW (N x 3 x 32 x 32,
any N) and return logits; the data's normalization and the class names are inside the
file. safetensors writes a folder in the Hugging Face layout: model.safetensors (the
network's weights, with the normalization and class names in its metadata) and
config.json (the run's config); cifar_ddp.load_model(FOLDER) and predict read it. By
default the weights the run evaluated are exported (the EMA's when it kept one; --ema or
--raw to choose). Parity: the file and PyTorch score the first --parity-images images of
the run's test split (its config plus overrides, e.g. data.root=DIR); the largest |logit
difference| must be <= --tolerance and every top-1 must agree, else nothing is written
and the status is 1. The export is written to a temporary name beside --out and
moved into place only once the check passes; it never replaces its checkpoint nor any
existing file, except an earlier export with --force. ONNX is run with onnxruntime for
that check.
"""

PREDICT = """Classify image files with a checkpoint or an exported model.

    cifar-ddp predict --model runs/fast85/checkpoints/best.pt cat.png ship.jpg
    cifar-ddp predict --model best.onnx --top 3 --json images/*.png
    cifar-ddp predict --model best.ts photos/

A folder stands for every image file in it (.png, .jpg, ...: by name, sorted, not its
sub-folders); the other entries are skipped, and their number said on stderr.

--model: a checkpoint (.pt, written by train), an ONNX file (.onnx), a TorchScript file
(.ts) or a safetensors export (its folder, or its model.safetensors) written by export.
Images of any size are converted to RGB and resized to 32 x 32. One line per image: the
file, the predicted class and its probability (with --top K, the K most likely).
"""

LR_FIND = """LR range test: suggest a peak learning rate (train.lr) for a config.

    cifar-ddp lr-find --config fast85 data.root=/path/to/cifar10-jpeg
    torchrun --nproc_per_node 2 -m cifar_ddp lr-find --config fast85 --steps 300

Trains a fresh model for --steps steps (default 200) with the learning rate growing
exponentially from --start to --end, with the config's batch, optimizer, precision and
augmentation; stops early when the smoothed loss exceeds 4x its best. Saves the plot
(default: OUT_DIR/lr_find.png) and prints the suggestion - the LR of the steepest fall of
the smoothed loss - as the train.lr to put in the config (train.lr is for a global batch
of train.lr_reference_batch, 256, and is scaled linearly with the real one).
--print-config shows the whole config that would run and exits.
"""

SUMMARY = """Layer table of a model, in the layout of the seed's torchsummary table, plus
receptive-field and multiply-accumulate columns, then one line per design rule of the
config (rules:), each with the measured value and the limit.

    cifar-ddp summary --config seed
    cifar-ddp summary --config seed model.name=nets/tiny.py:TinyNet

Exit status: 0 when every rule holds (or none is set), 2 when one is broken or the
config or model cannot be built - usable as a check in a student's CI.
"""

CONFIGS = """List the configs that ship with cifar_ddp, each with its purpose (the first line
of its comment). Pass a name to --config (`--config seed`); copy the file to change it.
"""

TRUST_HELP = ("import the user's own network the checkpoint names (model.name=path.py:Class) "
              "without naming it again; importing runs that file's code")


def _config_arguments(parser: argparse.ArgumentParser, default: Optional[str] = "seed") -> None:
    shown = f"default: {default}" if default else "default: the built-in defaults"
    parser.add_argument("--config", default=default,
                        help=f"a packaged config's name (cifar-ddp configs lists them), or a YAML/JSON file ({shown})")


def _print_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="print the config that would run (the file, the overrides and every default) as YAML, "
                             "and exit; it can be saved and passed back as --config")


# --------------------------------------------------------------------------- train


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest good checkpoint in out_dir, and stop if there is none "
                             "(train.resume=latest; train.resume=auto starts fresh instead; a file: train.resume=PATH)")
    _print_config_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.epochs=10 data.source=fake")


def _train(args: argparse.Namespace) -> int:
    from .launcher import run_training

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=latest")
    if args.print_config:
        return _print_config(args.config, overrides)
    return run_training(args.config, overrides)


def _print_config(config: Optional[str], overrides: List[str]) -> int:
    import yaml

    from .config import load_config
    from .errors import exit_on_user_error

    def work() -> int:
        cfg = load_config(config, overrides)
        print(f"# the config that would run: {config or 'the defaults'}"
              + (f" with {' '.join(overrides)}" if overrides else "") + ", every default included")
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None), end="", flush=True)
        return 0

    return exit_on_user_error(work)


# --------------------------------------------------------------------------- evaluate


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by train")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--tta", action="store_true", help="also report the accuracy with flip TTA (the logits of each "
                        "image and its mirror averaged), beside the plain one")
    parser.add_argument("--report", metavar="DIR", help="write report.md, index.html and pictures there: "
                        "confusion matrix, per-class precision/recall/F1, calibration, the most confident "
                        "mistakes and their Grad-CAM")
    parser.add_argument("--gallery", type=int, default=25, help="mistakes shown in the report (default %(default)s)")
    parser.add_argument("--cam-layer", default="", help="the layer Grad-CAM looks at, a dotted module path "
                        "(default: the model's own choice, else its last module with a spatial output; "
                        "when that map is under 4x4, the last block whose map is 4x4 or more: c3 for the seed)")
    parser.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _evaluate(args: argparse.Namespace) -> int:
    from .launcher import run_evaluation

    return run_evaluation(args.checkpoint, args.overrides, args.json, args.tta, args.report, args.gallery,
                          args.cam_layer, args.trust_model_code)


# --------------------------------------------------------------------------- export


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    from .export import DEFAULT_TOLERANCE, FORMATS

    parser.add_argument("--checkpoint", required=True, help="a .pt file written by train")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", type=Path, help="the file to write (default: the checkpoint's name, .onnx or .ts, "
                                                 "beside it); for safetensors the folder (default: the checkpoint's "
                                                 "name without .pt, beside it)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--ema", action="store_true", help="export the EMA weights (fails if there are none)")
    weights.add_argument("--raw", action="store_true", help="export the raw weights even if there is an EMA")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest |logit difference| allowed (default %(default)s, fp32)")
    parser.add_argument("--parity-images", type=int, default=256, help="test images checked (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is an earlier export (never a "
                                                              "checkpoint or any other file)")
    parser.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides for the data, or model.name=REF to name the checkpoint's "
                             "own network")


def _export(args: argparse.Namespace) -> int:
    from .errors import exit_on_user_error

    return exit_on_user_error(lambda: _export_checked(args))


def _export_checked(args: argparse.Namespace) -> int:
    from . import export
    from .config import config_from_dict
    from .data.sources import ChannelStats, load_dataset
    from .errors import UserError
    from .inference import load_for_inference, uint8_to_input

    if args.parity_images < 1:
        raise UserError(f"--parity-images is {args.parity_images}; the check needs at least 1 test image")
    if not args.tolerance >= 0:
        raise UserError(f"--tolerance is {args.tolerance:g}; it is the largest |logit difference| allowed, >= 0")
    trained = load_for_inference(args.checkpoint, ema=True if args.ema else False if args.raw else None,
                                 overrides=args.overrides, trust_model_code=args.trust_model_code)
    folder = args.format == "safetensors"
    out = args.out or Path(args.checkpoint).with_suffix("" if folder else export.FORMATS[args.format])
    if folder:
        export.check_safetensors_destination(out, args.force)
    else:
        export.check_destination(out, args.format, Path(args.checkpoint), args.force)
    cfg = config_from_dict(trained.payload["config"], args.overrides)
    stats = ChannelStats.from_payload(trained.payload["stats"])
    test = load_dataset(cfg.data, seed=cfg.seed, with_train=False, stats=stats, classes=trained.classes).test
    images = uint8_to_input(test.images[:args.parity_images])
    if folder:
        parity = export.write_safetensors_checked(trained.model, trained.classes, trained.payload["config"],
                                                  trained.used_ema, out, images, args.tolerance, replace=args.force)
    else:
        parity = export.write_checked(trained.model, trained.classes, args.format, out, images, args.tolerance,
                                      replace=args.force)
    print(f"parity on {parity.images} test images: max |logit difference| {parity.max_abs_diff:.2e} "
          f"(tolerance {args.tolerance:g}), top-1 agrees on {parity.top1_agree}/{parity.images}")
    if not parity.ok(args.tolerance):
        print(f"error: the exported model does not match PyTorch; nothing was written ({out} is as it was)",
              file=sys.stderr)
        return 1
    written = out / export.SAFETENSORS_WEIGHTS if folder else out
    what = f"{written} and {out / export.SAFETENSORS_CONFIG}" if folder else str(out)
    print(f"exported {'EMA' if trained.used_ema else 'raw'} weights to {what} ({args.format}, "
          f"{written.stat().st_size / 2**20:.1f} MB); input: float RGB in [0, 1], N x 3 x 32 x 32")
    return 0


# --------------------------------------------------------------------------- predict


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="a checkpoint (.pt), .onnx or .ts file, or a safetensors export")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR",
                        help="PNG/JPEG files, or folders of them (and, for a checkpoint of a user's own "
                             "network, model.name=REF naming it)")
    parser.add_argument("--trust-model-code", action="store_true",
                        help="import the user's own network a checkpoint names without naming it again "
                             "(model.name=REF); importing runs that file's code")
    parser.add_argument("--top", type=int, default=1, help="how many classes to list per image (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of lines")


def _predict(args: argparse.Namespace) -> int:
    from .errors import exit_on_user_error

    # model.name=REF among the arguments names a checkpoint's own network (not an image).
    overrides = [str(p) for p in args.images if str(p).startswith("model.name=")]
    images = [p for p in args.images if str(p) not in overrides]
    return exit_on_user_error(lambda: _classify(args, images, overrides))


def _classify(args: argparse.Namespace, paths: List[Path], overrides: List[str]) -> int:
    import json

    import numpy as np
    import torch

    from . import export
    from .errors import UserError
    from .inference import image_files, load_for_inference, read_images

    if args.top < 1:
        raise UserError(f"--top is {args.top}; it is how many classes to list per image, at least 1")
    files, skipped = image_files(paths)
    for folder, count in skipped.items():
        entries = "1 entry that is not an image file" if count == 1 else f"{count} entries that are not image files"
        print(f"note: skipped {entries} in '{folder}'", file=sys.stderr)
    images = read_images(files)
    if args.model.suffix in (".pt", ".safetensors") or args.model.is_dir():
        load = load_for_inference if args.model.suffix == ".pt" else export.load_safetensors
        trained = load(args.model, overrides=overrides, trust_model_code=args.trust_model_code)
        with torch.no_grad():
            logits = trained.model(images).numpy()
        classes = trained.classes
    else:
        export.format_for(args.model)
        if not args.model.is_file():
            raise UserError(f"model file '{args.model}' does not exist")
        logits = export.run_exported(args.model, images)
        classes = export.exported_classes(args.model)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = shifted / shifted.sum(1, keepdims=True)
    results = []
    for path, row in zip(files, probabilities):
        best = np.argsort(-row)[:args.top]
        results.append({"image": str(path), "predictions": [
            {"class": classes[i] if i < len(classes) else str(i), "probability": round(float(row[i]), 4)}
            for i in best]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['image']}: " + ", ".join(f"{p['class']} {p['probability']:.1%}" for p in r["predictions"]))
    return 0


# --------------------------------------------------------------------------- lr-find


def _lr_find_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument("--steps", type=int, default=200, help="steps of the sweep (default %(default)s)")
    parser.add_argument("--start", type=float, default=1e-5, help="first LR (default %(default)s)")
    parser.add_argument("--end", type=float, default=10.0, help="last LR (default %(default)s)")
    parser.add_argument("--out", help="the plot to write (default: OUT_DIR/lr_find.png)")
    _print_config_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _lr_find(args: argparse.Namespace) -> int:
    from .launcher import run_lr_find

    if args.print_config:
        return _print_config(args.config, args.overrides)
    return run_lr_find(args.config, args.overrides, args.steps, args.start, args.end, args.out)


# --------------------------------------------------------------------------- summary, configs


def _summary_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser, default=None)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. model.dropout=0.1 or "
                                                     "model.name=path/to/file.py:ClassName model.args.width=24")


def _summary(args: argparse.Namespace) -> int:
    from .summary import print_summary

    return print_summary(args.config, args.overrides)


def _configs(args: argparse.Namespace) -> int:
    from .errors import exit_on_user_error

    return exit_on_user_error(_list_configs)


def _list_configs() -> int:
    from .config import packaged_config_names, packaged_configs_dir

    folder = packaged_configs_dir()
    names = packaged_config_names()
    width = max(map(len, names))
    print(f"configs for --config NAME (files in {folder}):")
    for name in names:
        print(f"  {name:<{width}}  {config_purpose(folder / f'{name}.yaml')}")
    print("beside them: rules/ (design rules a config names with `rules:`) and accelerate/ "
          "(configs for `accelerate launch --config_file`)")
    return 0


def config_purpose(path: Path) -> str:
    """A config's one-line purpose: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


# --------------------------------------------------------------------------- dispatch

# name -> (one-line help, description, arguments, what it does)
COMMANDS: Dict[str, Tuple[str, str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "train": ("train a model (also under torchrun / accelerate)", TRAIN, _train_arguments, _train),
    "evaluate": ("score a checkpoint on its evaluation split (test, or the val carve); --report for pictures", EVALUATE, _evaluate_arguments,
                 _evaluate),
    "export": ("write a checkpoint's model as ONNX, TorchScript or safetensors", EXPORT, _export_arguments, _export),
    "predict": ("classify image files with a checkpoint or an export", PREDICT, _predict_arguments, _predict),
    "lr-find": ("suggest train.lr with an LR range test", LR_FIND, _lr_find_arguments, _lr_find),
    "summary": ("a model's layer table and its design rules", SUMMARY, _summary_arguments, _summary),
    "configs": ("list the packaged configs", CONFIGS, lambda parser: None, _configs),
}


def run(command: str, argv: Sequence[str], prog: str) -> int:
    """One subcommand with its arguments; `prog` is the name its --help and errors show."""
    _, description, add_arguments, work = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    # Flags may stand anywhere among the key=value overrides.
    return work(parser.parse_intermixed_args(list(argv)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return run(argv[0], argv[1:], prog=f"cifar-ddp {argv[0]}")
    # argparse's subparsers cannot parse intermixed flags and overrides: they only list the
    # commands here, and say what is wrong with anything else (status 2).
    parser = argparse.ArgumentParser(
        prog="cifar-ddp", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, evaluate and ship compact CNNs on CIFAR-10 (also: python -m cifar_ddp COMMAND).",
        epilog="`cifar-ddp COMMAND --help` describes each command's arguments.")
    parser.add_argument("--version", action="version", version=f"cifar_ddp {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, (summary, *_) in COMMANDS.items():
        commands.add_parser(name, help=summary)
    parser.parse_args(argv)
    return 2   # not reached: a known command was dispatched above


if __name__ == "__main__":
    sys.exit(main())
