"""Export a trained model to ONNX, TorchScript or safetensors and check, in the same
command, that the exported file computes what PyTorch computes.

The exported model is `inference.NormalizedModel`: float RGB in [0, 1], NCHW, any batch
size (a dynamic batch axis) -> logits; the class names travel inside the file (ONNX
metadata "classes"; TorchScript extra file "classes.json"), so `launch/predict.py` needs
nothing else. safetensors holds weights, not code, in the Hugging Face layout: a folder
with `model.safetensors` (the network's state dict, with the normalization and the class
names in its metadata) and `config.json` (the run's config, which rebuilds the network).
Parity: the exported file and the PyTorch model score the same batch of real test images;
the largest |logit difference| must stay under a tolerance (1e-4 in fp32 by default) and
the top-1 class must agree on every image.
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
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from .errors import UserError
from .files import check_writable_folder

# safetensors: the suffix of the weights file; what is exported is a folder holding it.
FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "safetensors": ".safetensors"}
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_CONFIG = "config.json"
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


def _existing_parent(out: Path) -> Path:
    """The folder `out` goes in, refused unless it exists and is a folder."""
    parent = out.absolute().parent
    if parent.is_file() or not parent.exists():
        what = "is a file, not a folder" if parent.is_file() else "does not exist"
        raise UserError(f"the folder of --out '{out}', '{parent}', {what}; create it or pick another --out")
    return parent


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
    parent = _existing_parent(out)
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


def check_safetensors_destination(out: Path, force: bool) -> None:
    """As `check_destination`, for the folder a safetensors export goes to: it may exist, but
    what it holds is replaced only with --force and only when it is an earlier export (a
    run's out_dir, with the run's own config.json, is refused)."""
    if out.is_file():
        raise UserError(f"--out '{out}' is a file; a safetensors export is a folder ({SAFETENSORS_WEIGHTS} and "
                        f"{SAFETENSORS_CONFIG}): name a folder, e.g. --out {out.with_suffix('')}")
    parent = _existing_parent(out)
    check_writable_folder(out if out.is_dir() else parent, "--out folder")
    present = [name for name in (SAFETENSORS_WEIGHTS, SAFETENSORS_CONFIG) if (out / name).exists()]
    if present and not force:
        raise UserError(f"--out '{out}' already holds {' and '.join(present)}; pass --force to replace an earlier "
                        "export, or pick another --out")
    if present and not _is_safetensors_export(out):
        raise UserError(f"--out '{out}' holds {' and '.join(present)} but is not an earlier export (a run's "
                        "out_dir?); --force replaces only an export: pick another --out")


def _is_safetensors_export(folder: Path) -> bool:
    """What this module writes: weights whose metadata names the classes, and a config beside them."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / SAFETENSORS_WEIGHTS), framework="pt") as f:
            named = "classes" in (f.metadata() or {})
        return named and "model" in json.loads((folder / SAFETENSORS_CONFIG).read_text())
    except Exception:  # noqa: BLE001 - missing, damaged or something else: not an export
        return False


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


def write_safetensors_checked(model: torch.nn.Module, classes: List[str], config: Dict[str, Any], used_ema: bool,
                              out: Path, images: torch.Tensor, tolerance: float, replace: bool = False) -> Parity:
    """`out`/model.safetensors and `out`/config.json, as `write_checked` writes one file: into
    a temporary folder beside `out`, checked by loading them back as `load_safetensors`
    does, and only then moved into `out` (created if missing)."""
    staging = Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}."))
    names = (SAFETENSORS_WEIGHTS, SAFETENSORS_CONFIG)
    placed: List[Path] = []
    try:
        try:
            _write_safetensors(model, classes, config, used_ema, staging)
            # The network's code is imported already (the user named it to load the checkpoint).
            exported = load_safetensors(staging, trust_model_code=True).model
            with torch.no_grad():
                parity = _parity(model, exported(images).numpy(), staging / SAFETENSORS_WEIGHTS, images)
            if parity.ok(tolerance):
                for name in names:
                    with open(staging / name, "rb+") as f:
                        os.fsync(f.fileno())
                out.mkdir(exist_ok=True)
                for name in names:
                    if replace:
                        os.replace(staging / name, out / name)
                    else:
                        os.link(staging / name, out / name)   # never over a file that appeared meanwhile
                        placed.append(out / name)
                placed = []
        except FileExistsError:
            raise UserError(f"'{out}' received a {' or '.join(names)} from something else meanwhile; it is left "
                            "as it is") from None
        except OSError as exc:
            raise UserError(f"cannot write the export in '{out.absolute().parent}' ({exc.strerror}); free space "
                            "there or pick another --out") from None
    finally:
        for path in placed:          # half an export (the weights without their config) is none
            path.unlink(missing_ok=True)
        for name in names:
            (staging / name).unlink(missing_ok=True)
        staging.rmdir()
    return parity


def _write_safetensors(model: torch.nn.Module, classes: List[str], config: Dict[str, Any], used_ema: bool,
                       folder: Path) -> None:
    from safetensors.torch import save

    network = model.model                      # NormalizedModel: its normalization goes in the metadata
    # Each tensor on its own (safetensors refuses tensors sharing memory), in the layout it names.
    state = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in network.state_dict().items()}
    metadata = {"format": "pt", "classes": json.dumps(classes), "mean": json.dumps(model.mean.flatten().tolist()),
                "std": json.dumps(model.std.flatten().tolist()), "weights": "ema" if used_ema else "raw"}
    # As bytes, written by Python: the file gets the mode any other file would (save_file makes it 0600).
    (folder / SAFETENSORS_WEIGHTS).write_bytes(save(state, metadata=metadata))
    (folder / SAFETENSORS_CONFIG).write_text(json.dumps(config, indent=2))


def load_safetensors(path: str | Path, overrides: Sequence[str] = (), trust_model_code: bool = False):
    """An exported safetensors folder (or its model.safetensors) as an `inference.TrainedModel`:
    the network rebuilt from config.json, its weights, and the normalization and class names
    from the file's metadata. Loading reads tensors only; a user's own network named in the
    config is imported only as `inference.load_for_inference` would."""
    from safetensors import safe_open

    from .config import config_from_dict
    from .inference import NormalizedModel, TrainedModel
    from .models import build_model, require_named

    path = Path(path)
    weights = path / SAFETENSORS_WEIGHTS if path.is_dir() else path
    config_file = weights.parent / SAFETENSORS_CONFIG
    for needed in (weights, config_file):
        if not needed.is_file():
            raise UserError(f"'{needed}' does not exist; a safetensors export is a folder holding "
                            f"{SAFETENSORS_WEIGHTS} and {SAFETENSORS_CONFIG} (launch/export.py --format safetensors)")
    with _readable(weights, "a safetensors export"):
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
        classes, mean, std = (json.loads(metadata[key]) for key in ("classes", "mean", "std"))
    with _readable(config_file, "the config of a safetensors export"):
        tree = json.loads(config_file.read_text())
    cfg = config_from_dict(tree, list(overrides))
    require_named(cfg.model.name, overrides, trust_model_code, f"export '{weights}'")
    network = build_model(cfg)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"'{weights}' does not fit the network its {SAFETENSORS_CONFIG} describes "
                        f"({str(exc).splitlines()[0][:200]}); export it again") from None
    payload = {"config": tree, "stats": {"mean": mean, "std": std}, "classes": classes}
    return TrainedModel(NormalizedModel(network, mean, std).eval(), classes, metadata.get("weights") == "ema", payload)


def run_exported(path: Path, images: torch.Tensor) -> np.ndarray:
    """Logits of the exported file at `path` for `images` (N x 3 x 32 x 32, float in [0, 1])."""
    if path.suffix == ".safetensors":
        with torch.no_grad():
            return load_safetensors(path).model(images).numpy()
    if path.suffix == ".onnx":
        import onnxruntime

        with _readable(path, "an ONNX model"):
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        return _load_torchscript(path)(images).numpy()


def exported_classes(path: Path) -> List[str]:
    if path.suffix == ".safetensors":
        return load_safetensors(path).classes
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
    return _parity(model, run_exported(path, images), path, images)


def _parity(model: torch.nn.Module, exported: np.ndarray, path: Path, images: torch.Tensor) -> Parity:
    with torch.no_grad():
        reference = model(images).numpy()
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
           "exported_classes", "check_parity", "format_for", "SAFETENSORS_WEIGHTS", "SAFETENSORS_CONFIG",
           "write_safetensors_checked", "load_safetensors", "check_safetensors_destination"]
