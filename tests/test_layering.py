"""Layers go one way: command line -> producer / workers -> batch -> engine -> core.

Read from the source (every import statement, function-level ones included), so an import added
inside a function cannot sneak past; plus two checks on what a process really loads.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.importgraph import cycles, import_graph, layer, reachable

GRAPH = import_graph()
ALLOWED = {  # which layers each layer may import
    "core": {"core"},
    "workers": {"workers", "core"},
    "producer": {"producer", "core"},
    "cli": {"cli", "workers", "producer", "core"},
}
ENGINE_FORBIDDEN = {"celery", "kombu", "boto3", "botocore", "redis"}


def test_the_graph_sees_every_layer_and_function_level_imports():
    assert {layer(m) for m in GRAPH} == set(ALLOWED)
    # cmd_run imports the local run inside the function: it must be an edge.
    assert "workers.local_run" in GRAPH["posebatch.cli.run"]


def test_no_module_imports_itself_through_others():
    assert cycles(GRAPH) == []


def test_layers_import_only_downwards():
    wrong = sorted(f"{src} -> {dst}" for src, deps in GRAPH.items() for dst in deps
                   if layer(dst) is not None and layer(dst) not in ALLOWED[layer(src)])
    assert wrong == []


def test_no_cycle_between_top_level_packages():
    packages: dict[str, set[str]] = {}
    for src, deps in GRAPH.items():
        packages.setdefault(layer(src), set()).update(
            layer(d) for d in deps if layer(d) not in (None, layer(src)))
    assert cycles(packages) == []


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("workers.engine")))
def test_engine_never_reaches_celery_boto3_or_redis(module):
    assert reachable(GRAPH, module) & ENGINE_FORBIDDEN == set()


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {"posebatch.a": {"workers.b"}, "workers.b": {"posebatch.a"}}
    assert cycles(graph) == [["posebatch.a", "workers.b"]]
    assert layer("workers.b") not in ALLOWED[layer("posebatch.a")]


def _modules_after_import(code: str) -> set[str]:
    script = f"{code}\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    return set(out.stdout.split())


def test_engine_and_local_run_load_no_celery():
    mods = _modules_after_import("import workers.engine.pipeline, workers.batch, workers.local_run")
    assert "celery" not in mods


def test_producer_and_command_line_load_no_model_runtime():
    mods = _modules_after_import(
        "import producer.submit, producer.watch, producer.status, producer.schedule, "
        "producer.control, posebatch.cli")
    assert "onnxruntime" not in mods


def test_a_local_run_loads_no_broker_or_s3_client(tmp_path):
    """``posebatch run photos/`` talks to neither a broker nor S3: Celery, redis and boto3 stay
    unloaded (~0.5 s of start-up on a 2-core host), through what its handler opens."""
    mods = _modules_after_import(
        "import posebatch.cli, posebatch.cli.run, workers.loading, workers.local_run\n"
        "from posebatch.selection import open_input\n"
        f"open_input({str(tmp_path)!r})")
    assert mods & {"celery", "kombu", "redis", "boto3", "botocore"} == set()
    assert "workers.local_run" in mods
