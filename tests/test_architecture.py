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


def _module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__.py``)."""
    files = {}
    for path in CORE.rglob("*.py"):
        parts = list(path.relative_to(CORE).with_suffix("").parts)
        files[".".join(["pifa", *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return files


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from . import x`` counts as importing ``pifa.x``)."""
    files = _module_files()
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for alias in node.names:
                    if f"{module}.{alias.name}" in files:
                        edges.add(f"{module}.{alias.name}")
                    elif module in files:
                        edges.add(module)
        graph[name] = edges - {name}
    return graph


def test_no_import_cycles():
    """No module of the package imports, directly or through others, a module that imports it back
    (function-level and TYPE_CHECKING imports count too: a cycle hidden in a function is still one)."""
    graph = _import_graph()
    assert len(graph) > 30 and graph["pifa.compress"]
    cycles = []
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == start:
                cycles.append(start)
                break
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


MAX_FUNCTION_LINES = 60


def test_no_function_over_60_lines():
    """Every function and method in src/pifa, from its ``def`` line to its last line (docstring included)."""
    long = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(CORE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _core_files() -> list[Path]:
    return [p for p in CORE.rglob("*.py") if "app" not in p.relative_to(CORE).parts and p.name != "__main__.py"]


MESSAGE_BUILDERS = {"_fallback", "join_error"}  # core functions that write (part of) an error message


def _raised_text(path: Path) -> list[str]:
    """The string pieces of every ``raise`` statement in ``path`` and of the functions that build error
    messages (f-strings' literal parts included)."""
    texts = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) or (isinstance(node, ast.FunctionDef) and node.name in MESSAGE_BUILDERS):
            texts += [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return texts


def test_core_errors_name_arguments_not_command_line_flags():
    """src/pifa's errors are read by API users: they name the argument or config field (``batch_size``,
    ``latency_table``), never a ``--flag``; the one command line named is torchrun's own."""
    import re

    flags = []
    for path in _core_files():
        for text in _raised_text(path):
            flags += [f"{path.name}: {m}" for m in re.findall(r"--[a-z][a-z-]*", text.replace("torchrun --nproc", ""))]
    assert not flags, f"core error messages naming command-line flags: {flags}"


def test_every_cli_rewording_matches_a_core_message():
    """The command line's table of rewordings names phrases the core really raises (no silent drift)."""
    from pifa.app.flags import CLI_WORDING, cli_message

    core = "".join("".join(_raised_text(path)) for path in _core_files())
    for phrase, cli in CLI_WORDING:
        assert phrase in core, phrase
        assert cli_message(f"x {phrase} y") == f"x {cli} y"


def test_the_cli_names_every_config_field_by_its_flag():
    """Core errors name CompressionConfig's fields; the command line prints the flag its user typed instead."""
    import dataclasses

    from pifa.app.cli import build_parser
    from pifa.app.flags import cli_message

    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    flags = {option for action in compress._actions for option in action.option_strings}
    for field in dataclasses.fields(pifa.CompressionConfig):
        if field.name == "version":
            continue
        printed = cli_message(f"{field.name} 3 must be positive")
        flag = printed.split()[0]
        assert flag in flags and printed == f"{flag} 3 must be positive", printed
        if "_" in field.name:  # an identifier: reworded wherever it stands, not inside a longer name
            assert cli_message(f"it needs a {field.name}") == f"it needs a {flag}"
            assert cli_message(f"model.{field.name}x") == f"model.{field.name}x"
    assert cli_message("the achieved density 0.5") == "the achieved density 0.5"  # prose keeps its words


CLOCKS = {"time", "perf_counter", "monotonic", "process_time", "time_ns", "perf_counter_ns", "monotonic_ns"}
TIMED_ELSEWHERE: set[str] = set()


def _reads_a_clock(node: ast.AST, timed: set[str]) -> bool:
    """Whether ``node`` calls ``time.<clock>()`` or reads a name that holds a clock reading."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr in CLOCKS and (
                isinstance(sub.func.value, ast.Name) and sub.func.value.id == "time"):
            return True
        if isinstance(sub, ast.Name) and sub.id in timed:
            return True
    return False


def _timing_assertions(path: Path) -> list[str]:
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        timed: set[str] = set()
        for _ in range(2):  # names from clocks, then names computed from those
            for node in ast.walk(function):
                if isinstance(node, ast.Assign) and _reads_a_clock(node.value, timed):
                    timed.update(t.id for t in node.targets if isinstance(t, ast.Name))
        found += [f"{path.name}:{node.lineno}" for node in ast.walk(function)
                  if isinstance(node, ast.Assert) and _reads_a_clock(node.test, timed)]
    return found


def test_no_test_asserts_on_wall_clock_time():
    """A test that passes or fails with the machine's load tests the machine: bound waits with timeouts
    (which fail loudly) and check behaviour instead (the model was not loaded, the process was cut)."""
    tests = [p for p in Path(__file__).parent.glob("*.py") if p.name not in TIMED_ELSEWHERE]
    assert len(tests) > 20
    timed = [hit for path in tests for hit in _timing_assertions(path)]
    assert not timed, f"assertions on wall-clock time: {timed}"
