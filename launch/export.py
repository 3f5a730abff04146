#!/usr/bin/env python
"""Export a checkpoint's model to ONNX or TorchScript, and check it against PyTorch.

    python launch/export.py --checkpoint runs/fast85/checkpoints/best.pt --format onnx
    python launch/export.py --checkpoint CKPT --format torchscript --out model.ts data.root=DIR

The exported model takes float RGB images in [0, 1], NCHW (N x 3 x 32 x 32, any N) and
returns logits; the data's normalization and the class names are inside the file. By
default the weights the run evaluated are exported (the EMA's when it kept one; --ema or
--raw to choose). Parity: the file and PyTorch score the first --parity-images images of
the run's test split (its config plus overrides, e.g. data.root=DIR); the largest |logit
difference| must be <= --tolerance and every top-1 must agree, else nothing is written
and the status is 1. The file is written to a temporary name beside --out and
moved into place only once the check passes; it never replaces its checkpoint nor any
existing file, except an earlier export with --force. ONNX is run with onnxruntime for
that check.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar_ddp.launcher import run_command  # noqa: E402


def main() -> int:
    from cifar_ddp import export
    from cifar_ddp.config import config_from_dict
    from cifar_ddp.data.sources import ChannelStats, load_dataset
    from cifar_ddp.errors import UserError
    from cifar_ddp.inference import load_for_inference, uint8_to_input

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by launch/train.py")
    parser.add_argument("--format", required=True, choices=sorted(export.FORMATS))
    parser.add_argument("--out", type=Path, help="the file to write (default: the checkpoint's name, "
                                                 ".onnx or .ts, beside it)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--ema", action="store_true", help="export the EMA weights (fails if there are none)")
    weights.add_argument("--raw", action="store_true", help="export the raw weights even if there is an EMA")
    parser.add_argument("--tolerance", type=float, default=export.DEFAULT_TOLERANCE,
                        help="largest |logit difference| allowed (default %(default)s, fp32)")
    parser.add_argument("--parity-images", type=int, default=256, help="test images checked (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is an earlier export (never a "
                                                              "checkpoint or any other file)")
    parser.add_argument("--trust-model-code", action="store_true",
                        help="import the user's own network the checkpoint names (model.name=path.py:Class) "
                             "without naming it again; importing runs that file's code")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides for the data, or model.name=REF to name the checkpoint's "
                             "own network")
    args = parser.parse_intermixed_args()

    def work() -> int:
        if args.parity_images < 1:
            raise UserError(f"--parity-images is {args.parity_images}; the check needs at least 1 test image")
        if not args.tolerance >= 0:
            raise UserError(f"--tolerance is {args.tolerance:g}; it is the largest |logit difference| allowed, >= 0")
        trained = load_for_inference(args.checkpoint, ema=True if args.ema else False if args.raw else None,
                                     overrides=args.overrides, trust_model_code=args.trust_model_code)
        out = args.out or Path(args.checkpoint).with_suffix(export.FORMATS[args.format])
        export.check_destination(out, args.format, Path(args.checkpoint), args.force)
        cfg = config_from_dict(trained.payload["config"], args.overrides)
        stats = ChannelStats.from_payload(trained.payload["stats"])
        test = load_dataset(cfg.data, seed=cfg.seed, with_train=False, stats=stats, classes=trained.classes).test
        images = uint8_to_input(test.images[:args.parity_images])
        parity = export.write_checked(trained.model, trained.classes, args.format, out, images, args.tolerance,
                                      replace=args.force)
        print(f"parity on {parity.images} test images: max |logit difference| {parity.max_abs_diff:.2e} "
              f"(tolerance {args.tolerance:g}), top-1 agrees on {parity.top1_agree}/{parity.images}")
        if not parity.ok(args.tolerance):
            print(f"error: the exported model does not match PyTorch; nothing was written ({out} is as it was)",
                  file=sys.stderr)
            return 1
        print(f"exported {'EMA' if trained.used_ema else 'raw'} weights to {out} ({args.format}, "
              f"{out.stat().st_size / 2**20:.1f} MB); input: float RGB in [0, 1], N x 3 x 32 x 32")
        return 0

    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
