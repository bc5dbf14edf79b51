"""The package's shape: each layer imports only the layers below it, importing a module changes no process state,
a worker starts without transformers, and everything installs under the one name `fiddler_moe`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lower ranks first; a package may import packages of a lower rank (and itself), never one of its own rank or higher.
RANK = {"protocol": 0, "host": 0, "native": 1, "experts": 2, "expert_worker": 3, "coordinator": 3, "launch": 4,
        "serving": 5, "benchmarks": 6, "cli": 7}


def _modules() -> list[tuple[str, Path]]:
    """(package, file) for every Python file of the installed packages."""
    return [(package, path) for package in RANK for path in sorted((ROOT / package).rglob("*.py"))]


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (deferred imports inside functions count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def test_each_package_imports_only_the_layers_below_it():
    upward = []
    for package, path in _modules():
        for line, module in _imported(path):
            parts = module.split(".")
            if parts[0] in RANK:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module} outside the fiddler_moe namespace")
            elif parts[0] == "fiddler_moe" and len(parts) > 1 and parts[1] != package:
                if RANK[parts[1]] >= RANK[package]:
                    upward.append(f"{path.relative_to(ROOT)}:{line} ({package}) imports {module}")
    assert not upward, "imports that run up or across the layers:\n" + "\n".join(upward)


def test_every_folder_is_installed_under_fiddler_moe():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["packages"]) == {f"fiddler_moe.{package}" for package in RANK}
    assert setuptools["package-dir"] == {f"fiddler_moe.{package}": package for package in RANK}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert all(target.startswith("fiddler_moe.cli.") for target in scripts.values())


# What our code could set: threading and OpenMP variables, our own; libraries we import set others of theirs
# (torch's inductor sets its cache folder when transformers imports it).
_PROBE = """
import importlib, json, os, sys
OURS = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "FIDDLER_")
def ours():
    return {k: v for k, v in os.environ.items() if k.startswith(OURS)}
before = ours()
import torch
threads = torch.get_num_threads()
names = json.loads(sys.argv[1])
importlib.import_module("fiddler_moe.expert_worker.server")
importlib.import_module("fiddler_moe.cli.worker")
worker_pulled_transformers = "transformers" in sys.modules
for name in names:
    importlib.import_module(name)
after = ours()
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
if torch.get_num_threads() != threads:
    changed.append("torch.set_num_threads")
print(json.dumps({"changed": changed, "worker_pulled_transformers": worker_pulled_transformers}))
"""


def test_importing_any_module_changes_no_environment_and_a_worker_needs_no_transformers():
    names = []
    for package, path in _modules():
        relative = path.relative_to(ROOT / package).with_suffix("")
        parts = [part for part in relative.parts if part != "__init__"]
        names.append(".".join(["fiddler_moe", package, *parts]))
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], capture_output=True, text=True,
                         timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["changed"] == [], f"importing the package changed the environment: {result['changed']}"
    assert not result["worker_pulled_transformers"], "the worker process imports transformers"
