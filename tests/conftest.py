"""Shared fixtures: real redis-server and SeaweedFS S3 servers, and a fresh bucket per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from posebatch.jobstate import JobStore
from posebatch.testing.servers import RedisServer, S3Server, running_redis, running_s3


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free port; ``.stop()``/``.start()`` keep the port."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A private SeaweedFS S3 server with auth on; ``.stop()``/``.start()`` keep ports and data."""
    with running_s3(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty, uniquely named bucket; the AWS_* env vars point at ``s3_server``."""
    if not s3_server.running:  # a fault test stopped it and failed before starting it again
        s3_server.start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)  # these would override what we set below
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.make_bucket(f"t-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    """A job store on the session's redis-server, emptied first."""
    redis_server.start()
    s = JobStore(redis_server.client())
    s.r.flushall()
    return s
