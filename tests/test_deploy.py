"""Deployment files stay valid and agree with the code (Docker does not run on dev machines).

Each container command is parsed by the real CLI parser, each POSEBATCH_* variable must be a
setting the code reads, the autoscaler must watch the queue the workers consume, and every path
a Dockerfile copies must exist.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from posebatch.cli import make_argument_parser
from posebatch.queue import QUEUE
from posebatch.settings import ClusterSettings, JobSettings, RuntimeSettings, ServeSettings
from producer.schedule import load_schedule

ROOT = Path(__file__).resolve().parent.parent
EXTRA_VARS = {"POSEBATCH_CACHE", "POSEBATCH_BUILD_PYTHON", "POSEBATCH_LOG_JSON",
              "POSEBATCH_SSL_CERT_REQS"}
KNOWN_VARS = EXTRA_VARS | {f"POSEBATCH_{f.name.upper()}"
                           for cls in (JobSettings, RuntimeSettings, ServeSettings,
                                       ClusterSettings)
                           for f in fields(cls)}
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _k8s_containers():
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                yield path.name, c


def _posebatch_vars(text: str) -> set[str]:
    return set(re.findall(r"\bPOSEBATCH_[A-Z_]+\b", text))


def test_compose_commands_parse_with_the_real_cli():
    services = _compose()["services"]
    for name in ("worker-gpu", "worker-cpu", "producer", "control", "beat"):
        make_argument_parser().parse_args(services[name]["command"])


def test_gpu_worker_reserves_a_gpu():
    devices = _compose()["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]
    assert devices["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("path", [ROOT / "docker-compose.yml", *K8S,
                                  *sorted((ROOT / "deploy").glob("Dockerfile.*"))],
                         ids=lambda p: p.name)
def test_every_posebatch_variable_is_a_real_setting(path):
    unknown = _posebatch_vars(path.read_text()) - KNOWN_VARS
    assert not unknown, f"{path.name} sets variables the code never reads: {unknown}"


def test_k8s_container_args_parse_with_the_real_cli():
    seen = 0
    for _name, c in _k8s_containers():
        if c["image"].startswith("posebatch:"):
            make_argument_parser().parse_args(c["args"])
            seen += 1
    assert seen >= 4


def test_autoscaler_watches_the_queue_workers_consume():
    for doc in yaml.safe_load_all((ROOT / "deploy/k8s/keda-scaledobject.yaml").read_text()):
        if doc["kind"] == "ScaledObject":
            assert doc["spec"]["triggers"][0]["metadata"]["listName"] == QUEUE


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").glob("Dockerfile.*")),
                         ids=lambda p: p.name)
def test_dockerfiles_copy_paths_that_exist_and_extras_that_exist(path):
    text = path.read_text()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in src.split():
            assert (ROOT / item).exists(), f"{path.name} copies missing {item}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in re.findall(r"'\.\[(\w+)\]'", text):
        assert f"\n{extra} = [" in pyproject, f"{path.name} installs unknown extra {extra}"


def test_example_schedule_loads():
    schedule = load_schedule(ROOT / "deploy" / "schedules.example.toml")
    assert schedule["nightly-annotation"]["task"] == "posebatch.submit_job"


@pytest.mark.parametrize(("text", "message"), [
    ('[[job]]\ncron = "0 2 * *"\ninput = "a"\noutput = "b"\n', "expected 5 fields"),
    ('[[job]]\ncron = "0 2 * * *"\ninput = "a"\n', "missing \\['output'\\]"),
    ('[[job]]\ncron = "99 2 * * *"\ninput = "a"\noutput = "b"\n', "cron"),
    ('[[job]]\ncron = "0 2 * * *"\ninput = "a"\noutput = "b"\n[job.settings]\nnope = 1\n',
     "unknown job settings"),
    ("", "no \\[\\[job\\]\\] entries"),
])
def test_bad_schedules_are_refused_with_a_clear_message(tmp_path, text, message):
    from posebatch.errors import ConfigError

    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_schedule(path)


def test_serve_service_and_autoscaler_point_at_the_serve_deployment():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy/k8s/serve.yaml").read_text())}
    deployment, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "serve"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
