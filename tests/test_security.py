"""Security basics: Redis with a password over TLS, no credential in any output, keys that would
escape the output refused, and a least-privilege IAM policy for the workers.

The cluster part runs one real worker against a redis-server that requires a password and
speaks only TLS (``rediss://``, certificate checked against a CA made for the test) and the
SeaweedFS S3 server with auth on; then every byte the job produced or logged is searched for the
Redis password and the S3 secret key.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from posebatch.testing.cluster import (
    WorkerProcess,
    download_results,
    read_counts_csv,
    run_cli,
    worker_log,
)
from posebatch.testing.servers import RedisServer, S3Server, running_redis
from tests.devdata import require_dev_data
from tests.images import jpeg

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "redis-pw-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory) -> RedisServer:
    with running_redis(tmp_path_factory.mktemp("tls-redis"), password=PASSWORD,
                       tls=True) as server:
        yield server


@pytest.fixture(scope="module")
def secure(tls_redis, s3_server: S3Server, tmp_path_factory) -> dict:
    """One worker on the TLS + password Redis; a job over a few dev images and two bad files."""
    assert tls_redis.url.startswith(f"rediss://:{PASSWORD}@")
    dev = require_dev_data() / "images" / "mhp"
    bucket = s3_server.make_bucket(f"sec-{uuid.uuid4().hex[:12]}")
    client = s3_server.client()
    for p in sorted(dev.iterdir()):
        client.put_object(Bucket=bucket, Key=f"in/{p.name}", Body=p.read_bytes())
    client.put_object(Bucket=bucket, Key="in/bad.jpg", Body=b"not an image")
    client.put_object(Bucket=bucket, Key="in/tiny.jpg", Body=jpeg(10, 10))
    env = {**s3_server.env(), "POSEBATCH_BROKER_URL": tls_redis.url}
    workdir = tmp_path_factory.mktemp("secure-worker")
    worker = WorkerProcess(workdir, env, 0)
    outputs: list[str] = []
    try:
        worker.start()
        submitted = run_cli("submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out/",
                            env=env)
        job_id = submitted.stdout.split()[-1]
        waited = run_cli("wait", job_id, "--timeout", "120", "--no-progress", env=env,
                         check=False, timeout=150)
        status = run_cli("status", job_id, env=env)
        outputs += [p.stdout + p.stderr for p in (submitted, waited, status)]
        yield {"env": env, "bucket": bucket, "client": client, "job_id": job_id,
               "worker": worker, "outputs": outputs, "waited": waited, "workdir": workdir,
               "redis": tls_redis}
    finally:
        worker.stop()


@pytest.mark.cluster
def test_a_job_runs_over_tls_with_a_password(secure):
    assert secure["waited"].returncode == 1, secure["outputs"]  # done; the two bad files failed
    summary = download_results(secure["client"], secure["bucket"], "out/")["_summary.json"]
    assert summary["images_seen"] == 4 and summary["succeeded"] == 2
    log = worker_log(secure["worker"])
    assert "Connected to rediss://" in log


def test_a_plain_connection_or_a_wrong_password_is_refused(tls_redis):
    import redis

    plain = tls_redis.url.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(plain, socket_connect_timeout=2, socket_timeout=2).ping()
    wrong = tls_redis.url.replace(PASSWORD, "not-the-password")
    proc = run_cli("status", env={"POSEBATCH_BROKER_URL": wrong}, check=False, timeout=60)
    assert proc.returncode != 0
    assert "not-the-password" not in proc.stdout + proc.stderr


@pytest.mark.cluster
def test_no_credential_in_logs_results_summary_or_job_state(secure, s3_server):
    client, bucket = secure["client"], secure["bucket"]
    texts = list(secure["outputs"])
    texts.append(secure["worker"].log_path.read_text(errors="replace"))
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/"):
        for obj in page.get("Contents", []):
            texts.append(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                         .decode("utf-8", "replace"))
    r = secure["redis"].client()
    for key in r.scan_iter("posebatch:*"):
        kind = r.type(key).decode()
        value = {"hash": r.hgetall, "set": r.smembers, "zset": lambda k: r.zrange(k, 0, -1),
                 "string": r.get, "list": lambda k: r.lrange(k, 0, -1)}[kind](key)
        texts.append(repr(value))
    assert len(texts) > 10
    secrets = {"Redis password": PASSWORD, "S3 secret key": s3_server.secret_key}
    for name, secret in secrets.items():
        leaks = [t[max(0, t.find(secret) - 80): t.find(secret) + 20] for t in texts
                 if secret in t]
        assert not leaks, f"{name} leaked: {leaks}"
    assert "rediss://:**@" in texts[3]  # Celery masks the password in its banner


def test_s3_errors_do_not_print_the_secret(s3_server, bucket, tls_redis, tmp_path):
    """A wrong secret makes every request fail: the messages name the URL, never the secret."""
    wrong = "wrong-secret-" + os.urandom(6).hex()
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": wrong}
    for args in (["run", f"s3://{bucket}/", "--out", str(tmp_path / "o"), "--no-progress"],
                 ["submit", f"s3://{bucket}/", "--out", str(tmp_path / "o2"),
                  "--broker", tls_redis.url]):
        proc = run_cli(*args, env=env, check=False, timeout=120)
        assert proc.returncode != 0
        text = proc.stdout + proc.stderr
        assert f"s3://{bucket}/" in text, text
        assert wrong not in text and s3_server.secret_key not in text


# -- keys that would escape the output ----------------------------------------------------------

ESCAPING = ["../outside.jpg", "sub/../../outside.jpg", "/tmp/abs.jpg", "a/./../../outside.jpg"]


@pytest.mark.cluster
def test_escaping_keys_are_refused_by_the_cluster_in_local_mode(secure, tmp_path):
    """A job's keys come from listings and job files we do not control. With local folders,
    ``../`` would read and write outside them: each such key gets a refused-key error record
    and nothing is written outside OUT."""
    from posebatch.jobstate import JobStore
    from posebatch.settings import JobSettings
    from producer.status import wait
    from producer.submit import submit

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (tmp_path / "outside.jpg").write_bytes(jpeg(64, 48))  # what ../outside.jpg would read
    (src / "ok.jpg").write_bytes(jpeg(64, 48))
    url = secure["redis"].url
    job_id = submit(str(src), str(out), job=JobSettings(), broker_url=url,
                    keys=["ok.jpg", *ESCAPING], batch_images=8)
    p = wait(JobStore.from_url(url), job_id, poll=0.2, timeout=60, progress=False)
    assert p.done == 1 + len(ESCAPING) and p.failed == len(ESCAPING)
    rows = {r["key"]: r for r in read_counts_csv((out / "_counts.csv").read_bytes())}
    assert rows["ok.jpg"]["status"] == "ok"
    for key in ESCAPING:
        assert rows[key]["status"] == "error" and rows[key]["error_code"] == "282000"
        assert "refused key" in rows[key]["error_msg"]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                     if p.is_file())
    jobs = f"out/_jobs/{job_id}/"  # the job's record and own figures (README "Several jobs")
    assert written == ["in/ok.jpg", "out/_counts.csv", f"{jobs}_counts.csv", f"{jobs}_job.json",
                       f"{jobs}_summary.json", "out/_posebatch.json", "out/_summary.json",
                       "out/_tables.json", "out/ok.jpg.json", "outside.jpg"]


def test_escaping_keys_are_refused_by_the_local_batch_function(tmp_path):
    """The same refusal in the code behind `posebatch run`."""
    from posebatch.modelstore import resolve_model
    from posebatch.settings import JobSettings, RuntimeSettings, from_env
    from posebatch.storage import LocalStorage
    from workers.batch import process_keys
    from workers.engine.pipeline import PoseEngine
    from workers.engine.runner import PoseModel

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (tmp_path / "outside.jpg").write_bytes(jpeg(64, 48))
    (src / "ok.jpg").write_bytes(jpeg(64, 48))
    rt = from_env(RuntimeSettings)
    model = resolve_model(rt.model, rt.cache_dir)
    engine = PoseEngine(PoseModel(str(model.path), "cpu", 1), JobSettings(), 4, 2)
    records = process_keys(engine, LocalStorage(str(src)), LocalStorage(str(out)),
                           ["ok.jpg", *ESCAPING])
    by_key = {r.key: r for r in records}
    assert by_key["ok.jpg"].ok
    for key in ESCAPING:
        assert not by_key[key].ok and "refused key" in by_key[key].error_msg
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                     if p.is_file())
    assert written == ["in/ok.jpg", "out/ok.jpg.json", "outside.jpg"]


# -- least privilege ----------------------------------------------------------------------------

def test_worker_iam_policy_is_least_privilege():
    """deploy/iam-policy-worker.json: read the input, read and write the output, nothing else.
    ListBucket is there because without it S3 answers 403 instead of 404 for a result that does
    not exist yet, and the worker's skip-existing check would fail every batch."""
    policy = json.loads((ROOT / "deploy" / "iam-policy-worker.json").read_text())
    assert policy["Version"] == "2012-10-17"
    actions: dict[str, list[str]] = {}
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        for action in [st["Action"]] if isinstance(st["Action"], str) else st["Action"]:
            assert "*" not in action, action
            resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
            actions.setdefault(action, []).extend(resources)
    assert set(actions) == {"s3:GetObject", "s3:PutObject", "s3:ListBucket"}
    assert all(r.endswith("/*") and r.count("/") >= 2 for r in actions["s3:GetObject"])
    assert all(r.endswith("/*") and "output" in r.lower() for r in actions["s3:PutObject"])
    assert not any(r.endswith("/*") for r in actions["s3:ListBucket"])
