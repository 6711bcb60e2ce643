"""The stage registry (flows/stages.py), the code part of the cache key (tasks/closure.py) and the
import boundaries of flows/ and tasks/."""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows import embed_ddp, train_ddp
from flows.stages import BY_NAME, STAGE_NAMES, STAGES, Output, stages_to_run, unknown
from srdiff_core.config import load_config
from tasks import closure
from tasks.common import StageResult

REPO = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


# --- the registry --------------------------------------------------------------------------------

def test_the_registry_declares_the_five_stages_in_order():
    assert STAGE_NAMES == ("download", "shard", "embed", "train", "evaluate")
    assert {s.name: s.ddp_entry for s in STAGES if s.ddp_entry} == {"embed": embed_ddp, "train": train_ddp}
    assert {s.name: s.upstream for s in STAGES} == {
        "download": (), "shard": ("download",), "embed": ("shard",), "train": ("shard", "embed"),
        "evaluate": ("shard", "embed", "train")}


@pytest.mark.parametrize("stage", STAGES, ids=STAGE_NAMES)
def test_each_task_takes_exactly_the_inputs_its_stage_declares(stage):
    """The task's keyword arguments are cfg, key, run_id, one per declared input, and ddp_entry
    exactly when the stage has a torchrun entry point; every input is an output of an earlier stage."""
    params = set(inspect.signature(stage.task.fn).parameters)
    expected = {"cfg", "key", "run_id", *stage.inputs} | ({"ddp_entry"} if stage.ddp_entry else set())
    assert params == expected
    assert stage.task.name == stage.name
    for output in stage.inputs.values():
        assert isinstance(output, Output) and output.name in BY_NAME[output.stage].outputs
        assert STAGE_NAMES.index(output.stage) < STAGE_NAMES.index(stage.name)


def test_an_output_a_stage_does_not_write_cannot_be_referenced():
    with pytest.raises(ValueError, match="stage embed has no output 'model'"):
        BY_NAME["embed"].output("model")


def test_task_inputs_come_from_the_upstream_results_and_the_entry_point_is_passed_in():
    results = {s.name: _result(s.name) for s in STAGES}
    assert BY_NAME["train"].task_inputs(results) == {
        "shards_url": "/out/shard/shards", "restorecls_url": "/out/embed/restorecls", "srm_url": "/out/embed/srm",
        "ddp_entry": train_ddp}
    assert BY_NAME["shard"].task_inputs(results) == {"manifest_url": "/out/download/manifest"}
    with pytest.raises(RuntimeError, match="stage train returned no checkpoints output"):
        BY_NAME["train"].check_outputs(StageResult("train", "k", "d", outputs={"model": "m"}))


def test_stage_selection_and_refresh_are_validated_against_the_registry():
    assert stages_to_run(None) == list(STAGE_NAMES)
    assert stages_to_run(["train"]) == ["download", "shard", "embed", "train"]
    assert stages_to_run(["shard", "download"]) == ["download", "shard"]
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['trian'\]; choose from download, shard, embed, "
                                         r"train, evaluate"):
        stages_to_run(["trian"])
    assert unknown(["train"]) is None
    assert "unknown stage(s) to refresh ['x']" in str(unknown(["x"], "stage(s) to refresh"))


def test_the_subflows_are_named_after_the_stages():
    from flows.pipeline import SUBFLOWS

    assert {name: f.name for name, f in SUBFLOWS.items()} == {n: f"srdiff-{n}" for n in STAGE_NAMES}


def test_the_cli_names_the_registry_stages():
    """`srdiff run --help` lists the stages without importing every task (flows/cli.py); it must
    list the registry's."""
    from flows import cli

    run = cli.build_parser()._subparsers._group_actions[0].choices["run"]
    stages_help = next(a.help for a in run._actions if a.dest == "stages")
    assert stages_help.endswith(",".join(STAGE_NAMES))


# --- the code part of the cache key --------------------------------------------------------------

def _result(stage: str) -> StageResult:
    return StageResult(stage, key=f"key-{stage}", digest=f"digest-{stage}",
                       outputs={o: f"/out/{stage}/{o}" for o in BY_NAME[stage].outputs})


def _ancestors(stage: str) -> set[str]:
    found: set[str] = set()
    for up in BY_NAME[stage].upstream:
        found |= {up, *_ancestors(up)}
    return found


def _depths(roots: tuple[str, ...]) -> dict[str, int]:
    """Each module of the closure with its shortest import chain from the roots."""
    graph = closure.import_graph(roots)
    depth = {r: 0 for r in roots}
    frontier = list(roots)
    while frontier:
        nxt = []
        for name in frontier:
            for dep in graph.get(name, ()):
                if dep not in depth:
                    depth[dep] = depth[name] + 1
                    nxt.append(dep)
        frontier = nxt
    return depth


def test_the_closure_holds_what_the_hand_kept_list_missed():
    """The train stage runs modules the old STAGE_CODE left out (editing them reused the old model)."""
    train = closure.import_closure(BY_NAME["train"].code_roots)
    for module in ("srdiff_core.ema", "srdiff_core.unet_daclip", "srdiff_core.images", "storage.shards",
                   "tasks.common", "tasks.tracking", "flows.train_ddp", "flows.args"):
        assert module in train, module
    assert all(name.split(".")[0] in closure.PROJECT_PACKAGES for name in train)


@pytest.mark.parametrize("stage", STAGES, ids=STAGE_NAMES)
def test_the_closure_holds_every_project_module_the_stage_loads(stage):
    """What the static walk finds covers what Python actually loads for the stage's roots."""
    packages = list(closure.PROJECT_PACKAGES)
    code = ("import importlib, json, sys\n"
            f"for name in {list(stage.code_roots)!r}: importlib.import_module(name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    missed = loaded - set(closure.import_closure(stage.code_roots))
    assert not missed, missed


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of the project packages, which tasks.closure reads instead of the checkout."""
    for package in closure.PROJECT_PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(closure, "REPO_ROOT", tmp_path)
    _forget()
    yield tmp_path
    _forget()


def _forget() -> None:
    """Read the files again: the digest describes what the process first read, and the tree was edited."""
    closure.read_source.cache_clear()
    closure.cached_code_digest.cache_clear()


def _keys(cfg) -> dict[str, str]:
    _forget()
    results = {s.name: _result(s.name) for s in STAGES}
    return {s.name: s.cache_key(cfg, results) for s in STAGES}


@pytest.mark.parametrize("stage", STAGES, ids=STAGE_NAMES)
def test_editing_a_module_deep_in_a_stages_closure_changes_its_key_and_no_upstream_key(stage, tree):
    """The deepest module of the stage's closure that no upstream stage runs is edited on disk
    (in a copy of the tree): the stage's key changes, its upstream stages' keys do not."""
    cfg = load_config(TINY, [f"data_root={tree / 'data'}"])
    upstream = _ancestors(stage.name)
    shared = set().union(*(closure.import_closure(BY_NAME[u].code_roots) for u in upstream))
    depths = _depths(stage.code_roots)
    own = [m for m in closure.import_closure(stage.code_roots) if m not in shared]
    deep = max(own, key=lambda m: (depths[m], m))
    before = _keys(cfg)
    path = closure.module_path(deep, tree)
    path.write_text(path.read_text() + "\n# an edit\n")
    after = _keys(cfg)
    assert after[stage.name] != before[stage.name], deep
    assert {u: after[u] for u in upstream} == {u: before[u] for u in upstream}, deep


@pytest.mark.parametrize("stage", STAGES, ids=STAGE_NAMES)
def test_editing_any_module_a_stage_runs_changes_its_key(stage):
    """Every module of the closure, edited in turn (through the source reader): the stage's code
    digest changes each time. For train this is `srdiff run --stages train` recomputing after an
    edit to any module training imports."""
    roots = stage.code_roots
    base = closure.code_digest(roots)
    unchanged = []
    for name, path in closure.import_closure(roots).items():
        def edited(p: Path, target: Path = path) -> bytes:
            return closure.read_source(p) + (b"\n# an edit\n" if p == target else b"")

        if closure.code_digest(roots, read=edited) == base:
            unchanged.append(name)
    assert unchanged == []


def test_the_cached_code_digest_is_fixed_per_process(tree):
    """The pipeline keys a stage by the code its process loaded: a later edit on disk enters only
    a new process (a new `srdiff run`), or a cleared cache."""
    roots = BY_NAME["shard"].code_roots
    first = closure.cached_code_digest(roots)
    path = closure.module_path("storage.shards", tree)
    path.write_text(path.read_text() + "\n# an edit\n")
    assert closure.cached_code_digest(roots) == first
    closure.cached_code_digest.cache_clear()
    assert closure.cached_code_digest(roots) == first  # the sources as this process first read them
    _forget()
    assert closure.cached_code_digest(roots) != first


def test_relative_imports_and_function_level_imports_are_followed(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "storage").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "storage" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "a.py").write_text("from . import b\n\ndef f():\n    from storage.c import thing\n")
    (tmp_path / "tasks" / "b.py").write_text("import numpy\n")
    (tmp_path / "storage" / "c.py").write_text("thing = 1\n")
    assert list(closure.import_closure(["tasks.a"], tmp_path)) == [
        "storage", "storage.c", "tasks", "tasks.a", "tasks.b"]


# --- boundaries ----------------------------------------------------------------------------------

def _modules(package: str) -> list[str]:
    return sorted(f"{package}.{p.stem}" if p.stem != "__init__" else package
                  for p in (REPO / package).glob("*.py"))


def _cycle(graph: dict[str, tuple[str, ...]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def test_flows_imports_no_circle():
    """Every import in flows/ (inside functions too), walked with ast: no module of flows reaches
    itself again (e.g. pipeline -> train_ddp -> cli -> pipeline)."""
    graph = closure.import_graph(_modules("flows"))
    flows_graph = {m: tuple(d for d in deps if d.startswith("flows")) for m, deps in graph.items()
                   if m.startswith("flows")}
    assert set(_modules("flows")) <= set(flows_graph)
    assert _cycle(flows_graph) is None, " -> ".join(_cycle(flows_graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": ("b",), "b": ("c",), "c": ("a",)}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ("b",), "b": (), "c": ("a", "b")}) is None


def test_tasks_storage_and_core_never_reach_flows():
    """Dependencies point one way: nothing below flows imports it, and tasks/ names no flows
    module in its code (torchrun entry points are passed in)."""
    for package in ("tasks", "storage", "srdiff_core"):
        graph = closure.import_graph(_modules(package))
        assert not [m for m in graph if m.split(".")[0] == "flows"], package
    for path in (REPO / "tasks").glob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        named = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and id(n) not in docstrings and "flows." in n.value]
        assert named == [], path.name
