"""The import graph keeps data flowing one way (docs/architecture.md): no module imports
one from a higher layer, and the trainer is imported by the launcher alone. Read from the
source with ast, so an import inside a function counts too."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Lowest first; a module may import its own layer and the ones below it.
LAYERS = [
    ["errors", "config", "files", "distributed", "lock", "checkpoint", "timing", "layer_trace",
     "receptive_field", "rules"],
    ["models", "models.blocks", "models.registry", "models.references", "models.seed", "models.sep_resnet",
     "models.mixgate", "models.whitening", "data", "data.sources", "data.transforms", "data.mixing", "data.loaders", "optim", "ema", "step"],
    ["assembly"],
    ["engine"],
    ["resume", "inference", "metrics", "report", "loggers"],
    ["evaluation", "lr_find", "export", "summary"],
    ["trainer"],
    ["launcher"],
    # The faces: the command, the notebook API, and the package itself (which hands out the API).
    ["cli", "api", "__main__", "cifar_ddp"],
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO / "cifar_ddp").with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) or "cifar_ddp"


def imports(path: Path, package: str):
    """The cifar_ddp modules `path` imports, as names relative to cifar_ddp ("data.loaders");
    `package`: the package `path` is in, relative to cifar_ddp ("" at the top)."""
    found = set()
    tree = ast.parse(path.read_text())
    # What `python -m cifar_ddp.x` runs (an `if __name__ == "__main__":` block) is an entry
    # point, not part of the module: it may call the command line above it.
    tree.body = [node for node in tree.body if not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[:len(base) - (node.level - 1)]
            if node.module:
                found.add(".".join(base + [node.module]))
            else:   # from . import checkpoint: a module of the package (or a name in it)
                found.update(".".join(base + [a.name]) if ".".join(base + [a.name]) in LAYER
                             else ".".join(base) or "cifar_ddp" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cifar_ddp"):
            found.add(node.module[len("cifar_ddp."):] if node.module != "cifar_ddp" else "cifar_ddp")
        elif isinstance(node, ast.Import):
            found.update(a.name[len("cifar_ddp."):] for a in node.names if a.name.startswith("cifar_ddp."))
    return found


SOURCES = sorted((REPO / "cifar_ddp").rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_from_a_higher_layer(path: Path):
    name = module_name(path)
    assert name in LAYER, f"{name} has no layer: place it in LAYERS here and in docs/architecture.md"
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    higher = {dep: LAYER[dep] for dep in imports(path, package) if dep in LAYER and LAYER[dep] > LAYER[name]}
    assert not higher, f"{name} (layer {LAYER[name]}) imports from higher layers: {higher}"


def test_only_the_launcher_imports_the_trainer():
    importers = []
    for path in [*SOURCES, *(REPO / "launch").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        package = module_name(path).rpartition(".")[0] if path.is_relative_to(REPO / "cifar_ddp") else ""
        if path.is_relative_to(REPO / "cifar_ddp") and path.name == "__init__.py":
            package = module_name(path)
        if "trainer" in imports(path, package) and path != REPO / "cifar_ddp" / "trainer.py":
            importers.append(str(path.relative_to(REPO)))
    assert importers == ["cifar_ddp/launcher.py"]


def test_the_import_reader_sees_relative_and_absolute_imports(tmp_path: Path):
    """The reader itself, on a hand-made file: both spellings and a function-level import."""
    source = tmp_path / "x.py"
    source.write_text("from .engine import evaluate\nfrom . import checkpoint as ckpt, resume\n"
                      "import cifar_ddp.step\ndef f():\n    from cifar_ddp.trainer import run\n")
    assert imports(source, "") == {"engine", "checkpoint", "resume", "step", "trainer"}
    source.write_text("from ..config import Config\nfrom .sources import load_dataset\nfrom . import transforms\n")
    assert imports(source, "data") == {"config", "data.sources", "data.transforms"}
