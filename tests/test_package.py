"""The package as a user installs it: a wheel built from the checkout, installed (not
editable) into a folder of its own, and run from a folder outside the checkout.

A fresh virtual environment with torch would take gigabytes and minutes, so the wheel goes
into a --target folder put first on PYTHONPATH, and the test checks that the cifar_ddp
that runs is the installed one, not the checkout nor an editable install of it."""

import configparser
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, job_env

# What building a wheel reads; tests/ goes along so that "the wheel holds no tests" means something.
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "cifar_ddp", "configs", "tests")


def pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--disable-pip-version-check", "-q"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: an in-tree build/ folder left by an earlier build would add its stale files.
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (REPO / name).is_dir() else {}))
    wheels = tmp_path_factory.mktemp("wheels")
    pip("wheel", "--no-build-isolation", "-w", str(wheels), ".", cwd=source)
    (built,) = wheels.glob("cifar_ddp-*.whl")
    return built


def test_wheel_holds_the_package_its_configs_the_command_and_the_license_but_no_tests(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "cifar_ddp").rglob("*.py")}
    assert modules <= names, f"modules left out of the wheel (setup.cfg packages): {sorted(modules - names)}"
    configs = {"cifar_ddp/" + p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert {"cifar_ddp/configs/seed.yaml", "cifar_ddp/configs/smoke.yaml", "cifar_ddp/configs/rules/seed.yaml",
            "cifar_ddp/configs/accelerate/cpu_2proc.yaml"} <= configs <= names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n or n.startswith("launch/")]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names) and "License-File: LICENSE" in metadata
    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert dict(scripts["console_scripts"]) == {"cifar-ddp": "cifar_ddp.cli:main"}


@pytest.mark.slow
def test_installed_wheel_runs_from_a_folder_outside_the_checkout(wheel: Path, tmp_path: Path):
    site = tmp_path / "site"
    pip("install", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = job_env({"PYTHONPATH": str(site)})   # the installed copy only: not the checkout (job_env adds it)

    def cifar_ddp(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "cifar_ddp", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    where = subprocess.run([sys.executable, "-c", "import cifar_ddp, cifar_ddp.config as c; "
                            "print(cifar_ddp.__file__); print(c.packaged_configs_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    package, configs = where.stdout.split()
    assert Path(package).is_relative_to(site) and Path(configs) == site / "cifar_ddp" / "configs", where.stderr

    listing = cifar_ddp("configs").stdout
    assert f"files in {site / 'cifar_ddp' / 'configs'}" in listing and "  smoke " in listing and "  seed " in listing
    # The console script pip wrote runs the same command.
    script = subprocess.run([str(site / "bin" / "cifar-ddp"), "configs"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and script.stdout == listing, script.stderr[-2000:]

    out = elsewhere / "run"
    cifar_ddp("train", "--config", "smoke", "data.source=fake", "data.fake_size=64", f"out_dir={out}",
              "train.epochs=1", "train.progress_bar=false")
    best = out / "checkpoints" / "best.pt"
    assert best.is_file() and (out / "config.json").is_file() and (out / "training_log.md").is_file()
    # The default config (the packaged seed) and the rules file it names travelled with the wheel.
    seed = yaml.safe_load(cifar_ddp("train", "--print-config").stdout)
    assert seed["rules"]["max_params"] == 150576 and seed["model"]["name"] == "seed"
    report = json.loads(cifar_ddp("evaluate", "--checkpoint", str(best), "--json").stdout)
    assert report["images"] == 64 and 0 <= report["accuracy"] <= 1
    assert sorted(p.name for p in elsewhere.iterdir()) == ["run"]     # nothing else written where it ran
