"""The package's structure: the core never imports the application, and ``import pifa`` has no side effects."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pifa

CORE = Path(pifa.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved inside ``pifa``)."""
    tree = ast.parse(path.read_text())
    package = ["pifa", *path.parent.relative_to(CORE).parts]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_core_never_imports_the_application():
    # __main__.py is the `python -m pifa` entry point: it runs the application, nothing imports it
    core_files = [p for p in CORE.rglob("*.py") if "app" not in p.relative_to(CORE).parts and p.name != "__main__.py"]
    assert len(core_files) > 10
    for path in core_files:
        offending = sorted(n for n in _imports(path) if n == "pifa.app" or n.startswith("pifa.app."))
        assert not offending, f"{path.name} imports {offending}"


def test_the_application_is_where_the_cli_lives():
    assert (CORE / "app" / "cli.py").is_file() and not (CORE / "cli.py").exists()
    assert any(n.startswith("pifa.") for n in _imports(CORE / "app" / "cli.py"))


def test_import_has_no_side_effects_on_the_process():
    """pifa's own import adds nothing (transformers, imported first, installs a finder of its own)."""
    code = ("import os, sys, torch, transformers.quantizers.auto; before = list(sys.meta_path); "
            "env = dict(os.environ); import pifa; "
            "import json; print(json.dumps({'mkl': os.environ.get('MKL_DYNAMIC'), "
            "'meta_path_unchanged': sys.meta_path == before, 'env_unchanged': dict(os.environ) == env}))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MKL_DYNAMIC"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"mkl": None, "meta_path_unchanged": True, "env_unchanged": True}


def test_import_registers_the_quantizer_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["pifa"] is pifa.hf.PifaHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["pifa"] is pifa.hf.PifaQuantizationConfig


def test_every_method_has_one_entry():
    assert set(pifa.METHODS) == {"svd", "svd-llm", "m", "mpifa", "magnitude", "wanda", "sparsegpt", "ria"}
    assert {m.layer_kind for m in pifa.METHODS.values()} == {"lowrank", "pivot", "sparse"}
    assert all(pifa.CompressionConfig(method=name).spec is spec for name, spec in pifa.METHODS.items())
