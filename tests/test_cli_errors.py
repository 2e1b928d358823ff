"""Broker trouble reaches the user as one line and a named exit code, never a traceback or a
password."""

from __future__ import annotations

import subprocess
import sys

import pytest

from posebatch.testing.servers import free_ports, running_redis

SECRET = "s3cr3t-pw-for-cli-test"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("locked"), password=SECRET) as server:
        yield server


def cli(*args: str, broker: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "posebatch.cli", *args, "--broker", broker],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [("status", "job-x"), ("wait", "job-x"),
                                     ("submit", "/nonexistent-input", "--out", "/tmp/o")])
def test_wrong_redis_password_is_a_clear_config_error(locked_redis, command):
    proc = cli(*command, broker=f"redis://:wrong-{SECRET}@127.0.0.1:{locked_redis.port}/0")
    assert proc.returncode == 3, proc.stderr
    assert "Redis refused the credentials" in proc.stderr
    assert "Traceback" not in proc.stderr and SECRET not in proc.stderr + proc.stdout


def test_unreachable_broker_is_transient_exit_4_without_the_password():
    port = free_ports(1)[0]
    proc = cli("status", "job-x", broker=f"redis://:{SECRET}@127.0.0.1:{port}/0")
    assert proc.returncode == 4, proc.stderr
    assert "cannot reach the broker" in proc.stderr and SECRET not in proc.stderr


def test_unknown_job_says_how_to_recover(locked_redis):
    proc = cli("status", "no-such-job", broker=locked_redis.url)
    assert proc.returncode == 3
    assert "posebatch submit" in proc.stderr


def test_status_flags_a_running_job_without_progress():
    import time

    from posebatch.jobstate import JobProgress
    from producer.status import STALL_SECONDS, describe

    now = time.time()
    base = dict(job_id="j", state="running", total=10, done=4, failed=0, submitted=True,
                created="", started_at=now - 4000, finished=None, output="s3://b/o/")
    stale = describe(JobProgress(**base, updated_at=now - STALL_SECONDS - 60))
    fresh = describe(JobProgress(**base, updated_at=now - 5))
    assert "no progress for" in stale and "resubmit" in stale
    assert "no progress" not in fresh
