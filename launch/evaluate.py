#!/usr/bin/env python
"""Evaluate a checkpoint on the test split of the configured data (on the validation
carve, "val", when the checkpoint's config has data.val_size > 0).

    python launch/evaluate.py --checkpoint runs/fast85/checkpoints/best.pt
    python launch/evaluate.py --checkpoint CKPT data.source=folder data.root=DIR --json
    python launch/evaluate.py --checkpoint CKPT --report runs/fast85/report --tta

The run's own config (stored in the checkpoint) is the starting point; dotted
overrides change it, e.g. to point at another copy of the data. DIR may hold
only a test/ tree: normalization uses the statistics saved with the checkpoint.
Also runs under torchrun; the metrics are exact for any number of processes.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar_ddp.launcher import run_evaluation  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by launch/train.py")
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
    parser.add_argument("--trust-model-code", action="store_true",
                        help="import the user's own network the checkpoint names (model.name=path.py:Class) "
                             "without naming it again; importing runs that file's code")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    # Flags may stand anywhere among the key=value overrides.
    args = parser.parse_intermixed_args()
    return run_evaluation(args.checkpoint, args.overrides, args.json, args.tta, args.report, args.gallery,
                          args.cam_layer, args.trust_model_code)


if __name__ == "__main__":
    sys.exit(main())
