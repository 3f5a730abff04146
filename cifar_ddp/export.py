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
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
import torch

from .errors import UserError
from .files import check_writable_folder

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
    """Write `model` (eval mode, CPU, fp32) to `out` in `fmt` (see `write_checked` for the
    way a command writes one: checked, then moved into place)."""
    example = torch.rand(2, 3, 32, 32)
    if fmt == "onnx":
        _export_onnx(model, classes, example, out)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # TorchScript's deprecation notice: it still works
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(out), _extra_files={"classes.json": json.dumps(classes)})


def check_destination(out: Path, fmt: str, checkpoint: Path, force: bool) -> None:
    """Refuse, before any work, a destination that would lose a file or cannot be written:
    the wrong suffix (a checkpoint's .pt included), a folder, a missing or unwritable
    folder, the checkpoint itself, or an existing file (with --force: one that is not an
    earlier export)."""
    suffix = FORMATS[fmt]
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; name a file in it, e.g. --out {out / ('model' + suffix)}")
    if out.suffix != suffix:
        raise UserError(f"--out '{out}' does not end in {suffix}, the suffix of a --format {fmt} file (predict.py "
                        f"goes by it); name it {out.with_suffix(suffix).name}")
    parent = out.absolute().parent
    if parent.is_file() or not parent.exists():
        what = "is a file, not a folder" if parent.is_file() else "does not exist"
        raise UserError(f"the folder of --out '{out}', '{parent}', {what}; create it or pick another --out")
    check_writable_folder(parent, "--out folder")
    if out.exists() and Path(checkpoint).exists() and out.samefile(checkpoint):
        raise UserError(f"--out '{out}' is the checkpoint being exported; pick another --out")
    if out.exists() and not force:
        raise UserError(f"--out '{out}' already exists; pass --force to replace an earlier export, or pick "
                        "another --out")
    if out.exists():
        try:
            exported_classes(out)
        except UserError:
            raise UserError(f"--out '{out}' exists and is not an exported model; --force replaces only an earlier "
                            "export: pick another --out") from None


def write_checked(model: torch.nn.Module, classes: List[str], fmt: str, out: Path, images: torch.Tensor,
                  tolerance: float, replace: bool = False) -> Parity:
    """Export to a temporary file beside `out`, check its parity, and only if it passes move
    it to `out` (over an existing file only with `replace`). A failed check, a full disk or
    any error leaves `out` as it was and no temporary file behind."""
    fd, name = tempfile.mkstemp(dir=out.absolute().parent, prefix=f".{out.name}.", suffix=FORMATS[fmt])
    os.close(fd)
    temporary = Path(name)
    try:
        try:
            export(model, classes, fmt, temporary)
            parity = check_parity(model, temporary, images)
            if parity.ok(tolerance):
                with open(temporary, "rb+") as f:
                    os.fsync(f.fileno())
                if replace:
                    os.replace(temporary, out)
                else:
                    os.link(temporary, out)    # fails if `out` appeared meanwhile: never written over
        except FileExistsError:
            raise UserError(f"--out '{out}' was created by something else meanwhile; it is left as it is") from None
        except OSError as exc:
            raise UserError(f"cannot write the export in '{out.absolute().parent}' ({exc.strerror}); free space "
                            "there or pick another --out") from None
    finally:
        temporary.unlink(missing_ok=True)
    return parity


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

        with _readable(path, "an ONNX model"):
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        return _load_torchscript(path)(images).numpy()


def exported_classes(path: Path) -> List[str]:
    if path.suffix == ".onnx":
        import onnx

        with _readable(path, "an ONNX model"):
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(meta.get("classes", "[]"))
    files = {"classes.json": ""}
    _load_torchscript(path, files)
    return json.loads(files["classes.json"] or "[]")


def _load_torchscript(path: Path, extra_files=None):
    with warnings.catch_warnings(), _readable(path, "a TorchScript model"):
        warnings.simplefilter("ignore")   # TorchScript's deprecation notice: it still works
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files or {})


@contextlib.contextmanager
def _readable(path: Path, what: str):
    """A file that does not load (damaged, truncated, something else renamed) is the
    user's to fix: one line naming it."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - onnx, onnxruntime and torch.jit each raise their own
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"'{path}' cannot be read as {what} ({first}); export it again with "
                        "launch/export.py") from None


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


__all__ = ["FORMATS", "DEFAULT_TOLERANCE", "Parity", "export", "check_destination", "write_checked", "run_exported",
           "exported_classes", "check_parity", "format_for"]
