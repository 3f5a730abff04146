"""Export a trained model to ONNX or TorchScript and check, in the same command, that the
exported file computes what PyTorch computes.

The exported model is `inference.NormalizedModel`: float RGB in [0, 1], NCHW, any batch
size (a dynamic batch axis) -> logits; the class names travel inside the file (ONNX
metadata "classes"; TorchScript extra file "classes.json"), so `launch/predict.py` needs
nothing else. Parity: the exported file and the PyTorch model score the same batch of real
test images; the largest |logit difference| must stay under a tolerance (1e-4 in fp32 by
default) and the top-1 class must agree on every image.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
import torch

from .errors import UserError
from .files import atomic_write

FORMATS = {"onnx": ".onnx", "torchscript": ".ts"}
DEFAULT_TOLERANCE = 1e-4


@dataclass
class Parity:
    images: int
    max_abs_diff: float
    top1_agree: int

    def ok(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance and self.top1_agree == self.images


def export(model: torch.nn.Module, classes: List[str], fmt: str, out: Path) -> None:
    """Write `model` (eval mode, CPU, fp32) to `out` in `fmt`, atomically."""
    example = torch.rand(2, 3, 32, 32)
    buffer_path = out.with_name(f".{out.name}.export")
    try:
        if fmt == "onnx":
            _export_onnx(model, classes, example, buffer_path)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # TorchScript's deprecation notice: it still works
                traced = torch.jit.trace(model, example)
                torch.jit.save(traced, str(buffer_path), _extra_files={"classes.json": json.dumps(classes)})
        atomic_write(out, buffer_path.read_bytes())
    finally:
        buffer_path.unlink(missing_ok=True)


def _export_onnx(model: torch.nn.Module, classes: List[str], example: torch.Tensor, path: Path) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    # The exporter narrates each of its stages on stdout; the command prints its own summary.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: batch}}, verbose=False)
    program.save(str(path))
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "classes", json.dumps(classes)
    onnx.save(proto, str(path))


def run_exported(path: Path, images: torch.Tensor) -> np.ndarray:
    """Logits of the exported file at `path` for `images` (N x 3 x 32 x 32, float in [0, 1])."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        return _load_torchscript(path)(images).numpy()


def exported_classes(path: Path) -> List[str]:
    if path.suffix == ".onnx":
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(meta.get("classes", "[]"))
    files = {"classes.json": ""}
    _load_torchscript(path, files)
    return json.loads(files["classes.json"] or "[]")


def _load_torchscript(path: Path, extra_files=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # TorchScript's deprecation notice: it still works
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files or {})


def check_parity(model: torch.nn.Module, path: Path, images: torch.Tensor) -> Parity:
    with torch.no_grad():
        reference = model(images).numpy()
    exported = run_exported(path, images)
    if exported.shape != reference.shape:
        raise UserError(f"'{path}' returned logits of shape {exported.shape}, PyTorch {reference.shape}")
    return Parity(images=len(images), max_abs_diff=float(np.abs(exported - reference).max()),
                  top1_agree=int((exported.argmax(1) == reference.argmax(1)).sum()))


def format_for(path: Path) -> str:
    for fmt, suffix in FORMATS.items():
        if path.suffix == suffix:
            return fmt
    raise UserError(f"'{path}' is not an exported model this tool knows ({', '.join(FORMATS.values())}) "
                    "nor a checkpoint (.pt)")


__all__ = ["FORMATS", "DEFAULT_TOLERANCE", "Parity", "export", "run_exported", "exported_classes", "check_parity",
           "format_for"]
