"""The package's shape: one-way layering, importable modules, no optional imports, lint."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import tokensparse

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tokensparse"

LAYERS = ["ops", "state", "families", "methods", "api", "data|measure|train|viz|sweep|export|tune", "cli"]
"""Each module may import only from its own layer and the layers before it."""
LEAVES = {"errors", "spec", "models", "utils", "__init__", "__main__"}
"""Modules outside the layers that anyone may import (they import only leaves themselves)."""
OPTIONAL = {"transformers", "onnx", "onnxruntime"}
"""Optional dependencies: the only imports allowed inside functions."""
FAMILY_NAMES = {"vit", "levit", "convnext", "swin"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _layer(path: Path) -> tuple[str, int | None]:
    top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for i, layer in enumerate(LAYERS):
        if top in layer.split("|"):
            return top, i
    return top, None


def _imported(path: Path) -> list[tuple[ast.AST, str]]:
    """(node, top-level tokensparse module) for every import of a tokensparse module in ``path``."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    package = ["tokensparse", *rel[:-1]]  # the package this file is in (for __init__.py: itself)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            full = base + (node.module.split(".") if node.module else [])
            if full[0] != "tokensparse":
                continue
            targets = [full[1]] if len(full) > 1 else [a.name for a in node.names]
            out += [(node, t) for t in targets]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "tokensparse":
                    out.append((node, parts[1] if len(parts) > 1 else "__init__"))
    return out


def test_layers_point_one_way():
    wrong = []
    for path in _modules():
        top, layer = _layer(path)
        for node, target in _imported(path):
            t_top, t_layer = _layer(PACKAGE / f"{target}.py") if (PACKAGE / f"{target}.py").exists() else \
                _layer(PACKAGE / target / "__init__.py")
            if t_top == top:
                continue
            if layer is None and top not in ("__init__", "__main__"):  # a leaf imports only leaves
                ok = t_layer is None and t_top != "__init__"
            elif top in ("__init__", "__main__"):
                ok = True
            else:
                ok = t_layer is None and t_top != "__init__" or (t_layer is not None and t_layer <= layer)
            if not ok:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {t_top}")
    assert not wrong, "imports against the layering: " + "; ".join(wrong)


def test_no_function_local_imports_except_optional_dependencies():
    found = []
    for path in _modules():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                elif isinstance(node, ast.ImportFrom):
                    names = ["tokensparse"]
                else:
                    continue
                if any(n.split(".")[0] not in OPTIONAL for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {', '.join(names)}")
    assert not found, "function-local imports: " + "; ".join(found)


def test_no_family_tested_by_name_outside_families():
    found = []
    for path in _modules():
        if path.relative_to(PACKAGE).parts[0] == "families":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(c.value in FAMILY_NAMES for c in consts):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "family name compared outside families/: " + "; ".join(found)


def test_modules_import_as_modules_and_no_public_name_shadows_one():
    dv = importlib.import_module("tokensparse.methods.dynamicvit")
    assert inspect.ismodule(dv) and callable(dv.train_outputs)
    assert inspect.ismodule(importlib.import_module("tokensparse.train.finetune"))
    assert inspect.ismodule(importlib.import_module("tokensparse.train.calibrate"))
    shadowed = []
    for info in pkgutil.walk_packages(tokensparse.__path__, "tokensparse."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
        parent, _, leaf = info.name.rpartition(".")
        if not inspect.ismodule(getattr(sys.modules[parent], leaf)):
            shadowed.append(info.name)
    assert not shadowed, f"attributes hiding modules: {shadowed}"
    assert callable(tokensparse.patch) and callable(tokensparse.list_methods)
    assert tokensparse.info is tokensparse.location_records


def test_import_loads_no_optional_or_plotting_dependency():
    """``import tokensparse`` loads no optional dependency and no matplotlib; nor do the modules that do not
    draw (data, measure, train): only viz / sweep import matplotlib."""
    code = ("import sys, tokensparse; print(' '.join(sorted(m for m in sys.modules if '.' not in m)))\n"
            "import tokensparse.data, tokensparse.measure, tokensparse.train; print('matplotlib' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    top, plotting = res.stdout.strip().splitlines()
    assert not (set(top.split()) & (OPTIONAL | {"matplotlib"}))
    assert plotting == "False"


def test_ruff_is_clean():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "tokensparse", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
