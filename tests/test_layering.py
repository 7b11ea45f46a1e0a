"""The layering rule (docs/architecture.md): core/ imports no torch; server/ nothing from worker/,
layers/, loader/ or models/; engine/ nothing from layers/ or models/; models/ nothing of
quantization, checkpoints or workers (the model contract). Every import counts, those inside
functions too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "surge"

RULES = {
    "core": ("torch", "surge.worker", "surge.layers", "surge.loader", "surge.models", "surge.engine",
             "surge.executor", "surge.server"),
    "server": ("surge.worker", "surge.layers", "surge.loader", "surge.models", "surge.executor"),
    "engine": ("surge.layers", "surge.models"),
    "models": ("surge.layers.quantization", "surge.quant", "surge.loader", "surge.worker", "surge.engine",
               "surge.executor", "surge.server"),
    "tensor": ("surge.worker", "surge.layers", "surge.loader", "surge.models", "surge.engine", "surge.executor",
               "surge.server"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative ones resolved."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((node.lineno, module))
    return found


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports(layer):
    forbidden = RULES[layer]
    breaches = [f"{path.relative_to(ROOT.parent)}:{line} imports {module}"
                for path in sorted((ROOT / layer).rglob("*.py"))
                for line, module in imports(path)
                if any(module == f or module.startswith(f + ".") for f in forbidden)]
    assert not breaches, "\n".join(breaches)


def test_imports_inside_functions_and_relative_ones_count():
    source = "import os\ndef f():\n    from torch import nn\n    from ..layers import attention\n    from . import x\n"
    assert {m for _, m in imports_in(source, "surge.core")} == {"os", "torch", "surge.layers", "surge.core"}


def test_core_and_config_load_without_torch():
    """Importing every core/ module (and the configuration, and the tensor models but for their torch
    backend) brings in no torch, even indirectly."""
    modules = ["surge.config", "surge.core.runner_output", "surge.worker.reports", "surge.tensor.model",
               "surge.tensor.onnx_backend",
               *(f"surge.core.{p.stem}" for p in sorted((ROOT / "core").glob("*.py")) if p.stem != "__init__")]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
