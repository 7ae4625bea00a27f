"""The package structure: no import cycles, imports only down the layers of pipelines/__init__.py, every module
importable on its own, and the GPU-side modules importable without Ray, MLflow and pycocotools."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mrcnn", "pipelines")

# layer -> the layers it may import (besides itself); a layer is a sub-package or a top-level module of pipelines
ALLOWED = {
    "mrcnn": set(),
    "pipelines.infra": {"mrcnn", "pipelines"},  # `import mrcnn, pipelines`: the package roots, for their paths
    "pipelines.data": {"mrcnn", "pipelines.infra"},
    "pipelines.training": {"mrcnn", "pipelines", "pipelines.infra", "pipelines.data"},
    "pipelines.models": {"mrcnn", "pipelines.infra", "pipelines.data", "pipelines.training"},
    "pipelines.pictures": {"pipelines.infra"},
    "pipelines.evaluation": {"mrcnn", "pipelines.infra", "pipelines.data", "pipelines.models", "pipelines.pictures"},
    "pipelines.inspection": {"mrcnn", "pipelines.infra", "pipelines.data", "pipelines.models", "pipelines.pictures",
                             "pipelines.training"},
    "pipelines.serving": {"mrcnn", "pipelines.infra", "pipelines.data", "pipelines.models", "pipelines.evaluation"},
    "pipelines.dag": {"mrcnn", "pipelines.infra", "pipelines.data", "pipelines.training", "pipelines.evaluation"},
    "pipelines.cli_options": {"mrcnn", "pipelines.infra", "pipelines.data", "pipelines.training", "pipelines.models"},
    "pipelines.cli_deploy": {"pipelines.cli_options", "pipelines.evaluation", "pipelines.serving"},
    "pipelines": set(),
}
# modules the GPU machine imports (tests/gpu, bench/bench_gpu.py): it has no Ray, MLflow or pycocotools
GPU_SIDE = ("mrcnn.model", "mrcnn.config", "pipelines.data.shards", "pipelines.data.images",
            "pipelines.data.loader",
            "pipelines.training.loop", "pipelines.training.optim", "pipelines.training.checkpoints",
            "pipelines.training.precision", "pipelines.training.plan", "pipelines.training.step",
            "pipelines.training.trainer", "pipelines.training.hooks.averaging",
            "pipelines.training.hooks.checkpointing", "pipelines.training.hooks.progress",
            "pipelines.training.hooks.step_callback", "pipelines.training.hooks.validation",
            "tests.support.synthetic_batch",
            "pipelines.evaluation.inference")
GPU_FILES = tuple(str(p.relative_to(REPO)) for p in [*sorted((REPO / "tests" / "gpu").glob("*.py")),
                                                       *sorted((REPO / "bench").glob("*gpu*.py"))])


def project_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def module_path(name: str) -> Path:
    base = REPO.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imports_of(name: str, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file (inside functions too: a cycle hidden in a function
    is still a cycle)."""
    found = set()
    for node in ast.walk(ast.parse(module_path(name).read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for target in targets:
            if target in known and target != name:
                found.add(target)
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "mrcnn":
        return "mrcnn"
    return ".".join(parts[:2])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = set(project_modules())
    return {name: imports_of(name, known) for name in known}


def test_the_import_graph_has_no_cycle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_imports_go_down_the_layers_only(graph):
    wrong = []
    for name, deps in sorted(graph.items()):
        mine = layer(name)
        for dep in sorted(deps):
            theirs = layer(dep)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{name} imports {dep} ({mine} may import {sorted(ALLOWED[mine]) or 'nothing'})")
    assert not wrong, "\n".join(wrong)


def test_mrcnn_imports_nothing_from_pipelines_or_the_cli():
    for path in (REPO / "mrcnn").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not set(roots) & {"pipelines", "cli"}, f"{path.relative_to(REPO)}:{node.lineno}"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two graph tests can fail: a planted cycle and a planted upward import are found."""
    graph = {"pipelines.data.a": {"pipelines.data.b"}, "pipelines.data.b": {"pipelines.data.a"}}
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_the_import_graph_has_no_cycle(graph)
    with pytest.raises(AssertionError, match="pipelines.data.x imports pipelines.evaluation.y"):
        test_imports_go_down_the_layers_only({"pipelines.data.x": {"pipelines.evaluation.y"},
                                              "pipelines.evaluation.y": set()})


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_every_module_imports_on_its_own():
    """Each module imported first, with every other project module forgotten before it: an import that only works
    because another module ran first (or a cycle at import time) fails here."""
    code = f"""
import importlib, json, sys
failed = {{}}
for name in {project_modules() + ["cli"]!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("mrcnn", "pipelines", "cli")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps(failed))
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


def test_gpu_side_modules_import_without_ray_mlflow_and_pycocotools():
    code = f"""
import sys
for blocked in ("ray", "mlflow", "pycocotools"):
    sys.modules[blocked] = None  # any import of them now raises ImportError
for name in {GPU_SIDE!r}:
    __import__(name)
import importlib.util
for path in {GPU_FILES!r}:  # what the GPU machine runs: the GPU tests and the GPU benchmark
    spec = importlib.util.spec_from_file_location(path.replace("/", "_").removesuffix(".py"), path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print("ok")
"""
    out = _run(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
