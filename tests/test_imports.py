"""Every module in the project imports.

Oracle: an invariant. A module nobody imports can rot until it no longer imports at all (torchtune's HEAD
`dpo.py` once did); this test walks the source tree, so a new file is covered the moment it exists.
"""
import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ["models", "spl", "data", "eval"]
SCRIPTS = ["train", "sample"]


def _modules():
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).with_suffix("")
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(parts))
    return names + SCRIPTS


def test_module_list_is_not_empty():
    assert len(_modules()) >= len(PACKAGES) + len(SCRIPTS)


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name):
    importlib.import_module(name)


# README "Architecture": models <- data <- spl <- data.world <- eval. The embedded world (data/world/) sits above
# the method: its reward and report use spl; nothing in spl/ or the real-data path imports it.
LAYERS = {"models": 0, "data": 1, "spl": 2, "data.world": 3, "eval": 4}
# The one in-process entry to training is train.main / train.train: the experiments' policies and the world's
# builder (itself a script, `python -m data.world.build`) call it instead of starting `python train.py`.
MAY_IMPORT_TRAIN = {"eval/experiments/policies.py", "data/world/build.py"}


def _layer(module: str) -> int:
    """The layer of a dotted module name (the longest LAYERS prefix), -1 outside the project."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return -1


def _imported(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `source`, wherever it sits (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_imports_point_one_way():
    """No library module imports a script (train, sample) or a later layer: read with ast, so an import inside a
    function counts too. The detector is first shown to see a planted violation."""
    planted = "import torch\n\ndef f():\n    from sample import main\n    import eval.metrics\n    import data.world\n"
    assert _imported(planted) == [(1, "torch"), (4, "sample"), (5, "eval.metrics"), (6, "data.world")]
    assert [_layer(m) for _, m in _imported(planted)] == [-1, -1, 4, 3]
    wrong = []
    for path in sorted(p for package in ("models", "data", "spl", "eval") for p in (ROOT / package).rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        layer = _layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, module in _imported(path.read_text(encoding="utf-8")):
            script = module.split(".")[0] in SCRIPTS and not (module == "train" and name in MAY_IMPORT_TRAIN)
            if script or _layer(module) > layer:
                wrong.append(f"{name}:{line}: imports {module}")
    assert wrong == []


def test_train_functions_fit_on_a_screen():
    """Issue 23: train.py is the loop, at most ~400 lines, and its longest function at most 60 (ast's lines)."""
    tree = ast.parse((ROOT / "train.py").read_text(encoding="utf-8"))
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert len(lengths) > 10 and "run" in lengths and "loop" in lengths
    assert {name: n for name, n in lengths.items() if n > 60} == {}
    assert len((ROOT / "train.py").read_text(encoding="utf-8").splitlines()) <= 420


def test_library_modules_stay_readable():
    """Issue 23: no module under models/, data/, spl/ over 500 lines (one concept per file)."""
    long = {p.relative_to(ROOT).as_posix(): n for package in ("models", "data", "spl")
            for p in (ROOT / package).rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}
