"""Malformed URLs in settings are exit 3 naming the flag or variable (issue 21, row 9).

On the main before this change ``POSEBATCH_BROKER_URL=abc``, ``--broker http://x`` and
``AWS_ENDPOINT_URL=notaurl`` ended in exit 70 with a traceback ("a bug: please report it"):
redis-py, Celery and botocore raise a bare ValueError deep inside. Real processes, as a user
runs them; nothing here needs a server (the URL is refused before any connection).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from posebatch.testing.cluster import CLI
from tests.devdata import require_model
from tests.images import jpeg

pytestmark = pytest.mark.timeout(300)

BROKER = "--broker or POSEBATCH_BROKER_URL"
STATE = "--state or POSEBATCH_STATE_URL"

# (arguments, environment, words in the message); every case is exit 3
CASES = [
    (("status",), {"POSEBATCH_BROKER_URL": "abc"}, (BROKER, "'abc' is not a Redis URL")),
    (("status", "--broker", "http://x"), {}, (BROKER, "'http://x' is not a Redis URL")),
    (("wait", "job", "--broker", "redis://host:abc/0"), {}, (BROKER, "bad port")),
    (("submit", "{tmp}", "--out", "{tmp}/o", "--state", "localhost:6379"), {},
     (STATE, "is not a Redis URL")),
    (("jobs", "prune"), {"POSEBATCH_STATE_URL": "unix://"}, (STATE, "no socket path")),
    (("watch", "{tmp}", "--out", "{tmp}/o", "--once"), {"POSEBATCH_BROKER_URL": "amqp://h"},
     (BROKER, "is not a Redis URL")),
    (("submit", "{tmp}", "--out", "{tmp}/o", "--broker", "redis://:hunter2@h:99999/0"), {},
     (BROKER, "bad port", "***")),
    (("run", "s3://bucket/in/", "--out", "{tmp}/o"), {"AWS_ENDPOINT_URL": "notaurl"},
     ("AWS_ENDPOINT_URL='notaurl' is not an S3 endpoint URL",)),
    (("run", "{tmp}", "--out", "s3://bucket/out/"), {"AWS_ENDPOINT_URL_S3": "ftp://host"},
     ("AWS_ENDPOINT_URL_S3='ftp://host'",)),
    (("worker",), {"POSEBATCH_BROKER_URL": "abc"}, (BROKER,)),
    (("worker",), {"AWS_ENDPOINT_URL": "host:9000"}, ("AWS_ENDPOINT_URL='host:9000'",)),
    (("control",), {"POSEBATCH_BROKER_URL": "http://x"}, (BROKER,)),
]


def _cli(args, env, tmp):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("AWS_", "POSEBATCH_BROKER", "POSEBATCH_STATE"))}
    fake = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}
    return subprocess.run([*CLI, *(a.format(tmp=tmp) for a in args)], capture_output=True,
                          text=True, timeout=120, env={**clean, **fake, **env})


@pytest.mark.parametrize(("args", "env", "words"), CASES,
                         ids=[f"{a[0]}-{next(iter(e), a[-1])}" for a, e, _ in CASES])
def test_a_malformed_url_is_exit_3_naming_it(tmp_path, args, env, words):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    proc = _cli(args, env, tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stderr


def test_run_ignores_a_broker_url_it_does_not_use(tmp_path):
    require_model()
    (tmp_path / "a.jpg").write_bytes(jpeg())
    proc = _cli(("run", "{tmp}", "--out", "{tmp}/o", "--no-progress", "--imgsz", "64"),
                {"POSEBATCH_BROKER_URL": "abc"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
