#!/usr/bin/env python
"""Classify image files with a checkpoint or an exported model.

    python launch/predict.py --model runs/fast85/checkpoints/best.pt cat.png ship.jpg
    python launch/predict.py --model best.onnx --top 3 --json images/*.png
    python launch/predict.py --model best.ts photos/

A folder stands for every image file in it (.png, .jpg, ...: by name, sorted, not its
sub-folders); the other entries are skipped, and their number said on stderr.

--model: a checkpoint (.pt, written by launch/train.py), an ONNX file (.onnx) or a
TorchScript file (.ts) written by launch/export.py. Images of any size are converted to
RGB and resized to 32 x 32. One line per image: the file, the predicted class and its
probability (with --top K, the K most likely).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar_ddp.launcher import run_command  # noqa: E402


def main() -> int:
    import numpy as np
    import torch

    from cifar_ddp import export
    from cifar_ddp.errors import UserError
    from cifar_ddp.inference import image_files, load_for_inference, read_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a checkpoint (.pt), .onnx or .ts file")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR",
                        help="PNG/JPEG files, or folders of them (and, for a checkpoint of a user's own "
                             "network, model.name=REF naming it)")
    parser.add_argument("--trust-model-code", action="store_true",
                        help="import the user's own network a checkpoint names without naming it again "
                             "(model.name=REF); importing runs that file's code")
    parser.add_argument("--top", type=int, default=1, help="how many classes to list per image (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    args = parser.parse_intermixed_args()

    # model.name=REF among the arguments names a checkpoint's own network (not an image).
    overrides = [str(p) for p in args.images if str(p).startswith("model.name=")]
    args.images = [p for p in args.images if str(p) not in overrides]

    def work() -> int:
        if args.top < 1:
            raise UserError(f"--top is {args.top}; it is how many classes to list per image, at least 1")
        files, skipped = image_files(args.images)
        for folder, count in skipped.items():
            entries = "1 entry that is not an image file" if count == 1 else f"{count} entries that are not image files"
            print(f"note: skipped {entries} in '{folder}'", file=sys.stderr)
        images = read_images(files)
        if args.model.suffix == ".pt":
            trained = load_for_inference(args.model, overrides=overrides, trust_model_code=args.trust_model_code)
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

    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
