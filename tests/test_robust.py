"""Odd files and operator mistakes never stop, crash or silently corrupt a job (issue 11).

Table-driven: each case names the file or the mistake, how it is made (real files, a real S3
server), and the expected outcome. Every case failed on the main before this change: the run
stopped as "transient" (a symlink loop), crashed writing the summary (a non-UTF-8 name, a
foreign JSON), hung (a FIFO), accepted mixed results, claimed an output it never wrote, or gave
exit codes of the wrong class.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from posebatch.errors import BAD_SIZE, EMPTY_IMAGE, INTERNAL_ERROR
from posebatch.testing.cluster import CLI, read_counts_csv
from tests.images import jpeg

BAD_NAME = os.fsdecode(b"bad\xffname.jpg")  # not UTF-8: listed by Python with a surrogate
BAD_KEY = "bad*xffname.jpg"  # its key in JSON, CSV and S3 (posebatch.names)
FOREIGN = {"title": "a photo library's sidecar"}
AS_ROOT = os.geteuid() == 0  # root reads chmod 000 files: that case needs another user


def _symlink(target: str):
    return lambda p: os.symlink(target, p)


def _chmod000(p: Path) -> None:
    p.write_bytes(jpeg())
    p.chmod(0)


def _sparse(size: int):
    def make(p: Path) -> None:
        with open(p, "wb") as f:
            f.write(jpeg()[:100])
            f.truncate(size)
    return make


# name -> (how to make it, expected error code or None for a result, words in the message)
ODD_FILES: dict[str, tuple] = {
    "ok.jpg": (lambda p: p.write_bytes(jpeg()), None, ()),
    "loop.jpg": (_symlink("loop.jpg"), EMPTY_IMAGE, ("symbolic link loop",)),
    "dangling.jpg": (_symlink("gone.jpg"), EMPTY_IMAGE,
                     ("symbolic link to gone.jpg, which does not exist",)),
    "fifo.jpg": (os.mkfifo, EMPTY_IMAGE, ("FIFO", "not a regular file")),
    "folder/sparse 2 GiB.jpg": (_sparse(2 << 30), BAD_SIZE,
                                ("2147483648 bytes; the limit is 4194304 bytes",)),
    BAD_NAME: (lambda p: p.write_bytes(jpeg()), None, ()),
    "back\\slash.jpg": (lambda p: p.write_bytes(jpeg()), None, ()),
    "star*.jpg": (lambda p: p.write_bytes(jpeg()), None, ()),
    "sidecar.jpg": (lambda p: (p.write_bytes(jpeg()), Path(f"{p}.json").write_text(
        json.dumps(FOREIGN))), INTERNAL_ERROR, ("sidecar.jpg.json exists and is not a posebatch "
                                                "result", "not overwritten")),
    "IMG_0001": (lambda p: p.write_bytes(jpeg()), None, ()),  # a JPEG without extension
    **({} if AS_ROOT else {"noperm.jpg": (_chmod000, EMPTY_IMAGE, ("permission denied",))}),
}
KEY_OF = {BAD_NAME: BAD_KEY, "star*.jpg": "star**.jpg"}
NOT_IMAGES = ("notes", "readme.txt")  # extensionless text and a text file: not selected


def make_odd_folder(root: Path) -> None:
    for name, (make, _, _) in ODD_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
    (root / "notes").write_text("not an image\n")
    (root / "readme.txt").write_text("hello\n")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          input=stdin, env={**os.environ, "POSEBATCH_INTRA_THREADS": "1",
                                            **(env or {})})


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory) -> dict:
    """One `posebatch run d --out d` (output = input, so sidecars sit at result paths)."""
    root = tmp_path_factory.mktemp("odd")
    make_odd_folder(root)
    proc = cli("run", str(root), "--out", str(root), "--no-progress", timeout=60)
    return {"root": root, "proc": proc}


def test_odd_files_never_stop_the_run(odd_run):
    proc = odd_run["proc"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{len(ODD_FILES)} images" in proc.stdout


@pytest.mark.parametrize("name", sorted(ODD_FILES))
def test_each_odd_file_gets_its_outcome(odd_run, name):
    _, code, words = ODD_FILES[name]
    root: Path = odd_run["root"]
    rows = {r["key"]: r for r in read_counts_csv((root / "_counts.csv").read_bytes())}
    row = rows[KEY_OF.get(name, name)]
    if code is None:
        assert row["status"] == "ok", row
        result = json.loads((root / f"{name}.json").read_bytes())  # next to the real name
        assert result["person_num"] == len(result["person_info"])
        return
    assert row["error_code"] == str(code), row
    for word in words:
        assert word in row["error_msg"], row["error_msg"]
    result_path = root / f"{name}.json"
    if code == INTERNAL_ERROR:  # the foreign sidecar is left exactly as it was
        assert json.loads(result_path.read_text()) == FOREIGN
    else:
        assert json.loads(result_path.read_text())["error_code"] == code


def test_the_summary_and_csv_are_utf8_and_count_each_file_once(odd_run):
    root: Path = odd_run["root"]
    summary = json.loads((root / "_summary.json").read_text(encoding="utf-8"))
    keys = [r["key"] for r in read_counts_csv((root / "_counts.csv").read_bytes())]
    assert sorted(keys) == sorted(KEY_OF.get(n, n) for n in ODD_FILES)
    assert summary["images_seen"] == len(ODD_FILES)
    assert not any(k in keys for k in NOT_IMAGES)


def test_a_rerun_retries_only_216200_and_keeps_the_rest(odd_run):
    """Unreadable files (216200 "no image data:") may have been fixed since; the others keep
    their results."""
    root: Path = odd_run["root"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.json") if p.name[0] != "_"}
    proc = cli("run", str(root), "--out", str(root), "--no-progress", timeout=60)
    assert proc.returncode == 0, proc.stderr
    changed = {p.name for p, t in before.items() if p.stat().st_mtime_ns != t}
    retried = {f"{n.split('/')[-1]}.json" for n, (_, c, _) in ODD_FILES.items()
               if c == EMPTY_IMAGE}
    assert changed == retried


# -- the manifest: an interrupted --force, a run that never wrote -----------------------------

def test_an_interrupted_force_can_never_pass_for_a_finished_one(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(16):
        (src / f"{i:03d}.jpg").write_bytes(jpeg(64 + i, 48))
    small = ("--imgsz", "256")  # the model's cost, not the test's subject
    assert cli("run", str(src), "--out", str(out), "--no-progress", *small).returncode == 0
    manifest = out / "_posebatch.json"
    proc = subprocess.Popen([*CLI, "run", str(src), "--out", str(out), "--no-progress",
                             "--det-conf", "0.3", "--force", "--batch-size", "1", *small],
                            env={**os.environ, "POSEBATCH_INTRA_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while json.loads(manifest.read_text()).get("complete", True) and time.monotonic() < deadline:
        assert proc.poll() is None, "the --force run ended before it marked the output"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    again = cli("run", str(src), "--out", str(out), "--no-progress", "--det-conf", "0.3", *small)
    assert again.returncode == 3, again.stdout + again.stderr
    assert "did not finish" in again.stderr and "--force" in again.stderr
    assert cli("run", str(src), "--out", str(out), "--no-progress", "--det-conf", "0.3",
               "--force", *small).returncode == 0
    assert json.loads(manifest.read_text())["complete"] is True
    done = cli("run", str(src), "--out", str(out), "--no-progress", "--det-conf", "0.3", *small)
    assert done.returncode == 0 and "16 images" in done.stdout


def test_a_run_that_wrote_nothing_claims_nothing(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg())
    bad_model = tmp_path / "bad.onnx"
    bad_model.write_bytes(b"not an onnx model")
    failed = cli("run", str(src), "--out", str(out), "--model", str(bad_model))
    assert failed.returncode == 3, failed.stderr
    assert not (out / "_posebatch.json").exists()
    ok = cli("run", str(src), "--out", str(out), "--no-progress")
    assert ok.returncode == 0, ok.stderr


# -- selection: a single file, key lists, globs --------------------------------------------------

@pytest.mark.parametrize(("include", "exclude", "lines", "expected"), [
    ((), (), None, ["IMG_0002", "a.jpg", "c.jpg", "sub/b.png"]),  # extensionless JPEG sniffed
    ((), (), b"./a.jpg\na.jpg\n\nsub/b.png\r\nnotes\n", ["a.jpg", "sub/b.png", "notes"]),
    (("*.png",), (), None, ["sub/b.png"]),
    ((), ("sub/",), None, ["IMG_0002", "a.jpg", "c.jpg"]),
    (("/*.jpg",), ("c.*",), None, ["a.jpg"]),
])
def test_input_selection(tmp_path, include, exclude, lines, expected):
    """Which keys a job takes (the same function for `run` and `submit`), on real files."""
    from posebatch.selection import Selection, keys_from_lines, select_keys
    from posebatch.storage import LocalStorage

    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "c.jpg", "IMG_0002", "sub/b.png"):
        (tmp_path / name).write_bytes(jpeg())
    (tmp_path / "notes").write_text("text without extension\n")
    src = LocalStorage(str(tmp_path))
    keys = None if lines is None else keys_from_lines(lines, src)
    assert list(select_keys(src, Selection(include, exclude, keys))) == expected


def test_run_takes_a_single_file(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "in" / "other.jpg").write_bytes(jpeg())
    proc = cli("run", str(tmp_path / "in" / "a.jpg"), "--out", str(tmp_path / "out"),
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "_counts.csv", "_posebatch.json", "_summary.json", "a.jpg.json"]


@pytest.mark.parametrize("name", [b"plain.jpg", b"caf\xc3\xa9.jpg", b"bad\xff\x80.jpg",
                                  b"star*x80.jpg", b"**", b"back\\slash", b"*xff*"])
def test_names_round_trip_through_keys(name):
    from posebatch.names import key_from_name, name_from_key

    key = key_from_name(os.fsdecode(name))
    key.encode("utf-8")  # always encodable
    assert os.fsencode(name_from_key(key)) == name


# -- bounds and exit codes -----------------------------------------------------------------------

@pytest.mark.parametrize(("args", "env", "code", "words"), [
    (("run", "{tmp}", "--out", "{tmp}/o", "--imgsz", "100000"), {}, 3, "imgsz must be"),
    (("run", "{tmp}", "--out", "{tmp}/o"), {"POSEBATCH_IMGSZ": "4096"}, 3, "imgsz must be"),
    (("run", "{tmp}", "--out", "{tmp}/o", "--batch-size", "100000"), {}, 3, "batch_size"),
    (("run", "{tmp}", "--out", "{tmp}/o", "--io-threads", "1000"), {}, 3, "io_threads"),
    (("run", "{tmp}", "--out", "{tmp}/o", "--max-image-bytes", "0"), {}, 3, "max_image_bytes"),
    (("run", "{tmp}", "--out", "{tmp}/o", "--det-conf", "nan"), {}, 3, "det_conf"),
    (("submit", "{tmp}", "--out", "{tmp}/o", "--batch-images", "0"), {}, 2, "--batch-images"),
    (("watch", "{tmp}", "--out", "{tmp}/o", "--interval", "0"), {}, 2, "--interval"),
    (("wait", "job", "--timeout", "inf"), {}, 2, "--timeout"),
    (("worker", "--concurrency", "0"), {}, 2, "--concurrency"),
    (("run", "{tmp}", "--out", "{tmp}/file"), {}, 3, "is a file, not a folder"),
])
def test_bad_numbers_and_paths_are_refused_with_the_right_code(tmp_path, args, env, code,
                                                                words):
    (tmp_path / "file").write_text("x")
    proc = cli(*(a.format(tmp=tmp_path) for a in args), env=env, timeout=60)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_an_unexpected_error_exits_70_with_its_traceback(monkeypatch, capsys):
    from posebatch.cli import main, run

    def boom(_ns):
        raise RuntimeError("a bug")

    monkeypatch.setattr(run, "cmd_run", boom)
    assert main(["run", "x", "--out", "y"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug" in err and "please report" in err


def test_help_lists_exit_codes_and_every_command_describes_itself():
    import argparse

    from posebatch.cli import exitcodes, make_argument_parser

    parser = make_argument_parser()
    text = parser.format_help()
    for code, _ in exitcodes.TABLE:
        assert f"{code:>3}  " in text
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    for name, sub in subs.choices.items():
        assert sub.description, f"`posebatch {name}` has no description"
        for action in sub._actions:
            if action.default not in (None, False, [], argparse.SUPPRESS) and action.help:
                assert "default" in action.help, f"{name} {action.option_strings}"


def test_status_of_a_finished_job_keeps_its_rate(monkeypatch):
    from posebatch.jobstate import JobProgress

    p = JobProgress(job_id="j", state="done", total=10, done=10, failed=0, submitted=True,
                    created="", started_at=1000.0, updated_at=1010.0, finished="x", output="o")
    monkeypatch.setattr(time, "time", lambda: 5000.0)
    assert p.rate == pytest.approx(1.0)


# -- S3: a per-object AccessDenied, wrong credentials, names in S3 keys --------------------------

def test_s3_denied_object_is_one_error_and_the_job_goes_on(s3_server, bucket, tmp_path):
    client = s3_server.client()
    for key in ("in/a.jpg", "in/secret.jpg", "in/b.jpg"):
        client.put_object(Bucket=bucket, Key=key, Body=jpeg())
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": ["s3:GetObject"],
            "Resource": [f"arn:aws:s3:::{bucket}/in/secret.jpg"]}]}))
    out = tmp_path / "out"
    proc = cli("run", f"s3://{bucket}/in/", "--out", str(out), "--no-progress",
               env=s3_server.env())
    assert proc.returncode == 0, proc.stderr
    rows = {r["key"]: r for r in read_counts_csv((out / "_counts.csv").read_bytes())}
    assert rows["a.jpg"]["status"] == rows["b.jpg"]["status"] == "ok"
    assert rows["secret.jpg"]["error_code"] == str(EMPTY_IMAGE)
    assert "access denied" in rows["secret.jpg"]["error_msg"]


@pytest.mark.parametrize(("mistake", "words"), [
    ("wrong secret", "SignatureDoesNotMatch"),
    ("no permission to list", "AccessDenied"),
])
def test_s3_credential_mistakes_exit_3_not_4(s3_server, bucket, tmp_path, mistake, words):
    env = s3_server.env()
    if mistake == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-value"
    else:
        s3_server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({
            "Version": "2012-10-17", "Statement": [{
                "Effect": "Deny", "Principal": "*", "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"]}]}))
    proc = cli("run", f"s3://{bucket}/in/", "--out", str(tmp_path / "o"), env=env)
    assert proc.returncode == 3, proc.stderr
    assert words in proc.stderr and "wrong-secret-value" not in proc.stderr


def test_non_utf8_names_become_escaped_s3_keys(s3_server, bucket, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / BAD_NAME).write_bytes(jpeg())
    proc = cli("run", str(src), "--out", f"s3://{bucket}/out/", "--no-progress",
               env=s3_server.env())
    assert proc.returncode == 0, proc.stderr
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"out/{BAD_KEY}.json" in keys


def test_archived_s3_object_is_unreadable_not_transient():
    """SeaweedFS has no archive tier: the mapping of S3's answer is checked on its own."""
    from botocore.exceptions import ClientError

    from posebatch.errors import ObjectUnreadable
    from posebatch.s3storage import S3Storage

    err = ClientError({"Error": {"Code": "InvalidObjectState", "Message": "archived"},
                       "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    mapped = S3Storage("b", "in")._error(err, "read", "x.jpg")
    assert isinstance(mapped, ObjectUnreadable) and "restore it" in str(mapped)


def test_size_is_checked_before_the_bytes_are_read(tmp_path):
    """A 1 GiB (sparse) file over the limit: refused after reading at most a few KiB."""
    from posebatch.errors import ObjectTooLarge
    from posebatch.storage import LocalStorage

    _sparse(1 << 30)(tmp_path / "big.jpg")

    def read_chars() -> int:
        io = Path("/proc/self/io").read_text()
        return int(next(line for line in io.splitlines() if line.startswith("rchar")).split()[1])

    before = read_chars()
    with pytest.raises(ObjectTooLarge):
        LocalStorage(str(tmp_path)).read("big.jpg", max_bytes=4 << 20)
    assert read_chars() - before < 1 << 20


# -- recount ---------------------------------------------------------------------------------------

def test_recount_changes_only_the_counts(tmp_path):
    from tests.devdata import require_dev_data

    photo = require_dev_data() / "images" / "posetrack18" / (
        "images_val_003418_mpii_test_000000.jpg")
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "people.jpg").write_bytes(photo.read_bytes())
    (src / "empty.jpg").write_bytes(b"")
    assert cli("run", str(src), "--out", str(out), "--no-progress").returncode == 0
    first = json.loads((out / "_summary.json").read_text())
    results = {p.name: p.read_bytes() for p in out.glob("*.jpg.json")}
    assert first["valid_persons_total"] > 0

    strict = cli("recount", str(out), "--valid-box-score", "0.999")
    assert strict.returncode == 0, strict.stderr
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["valid_persons_total"] < first["valid_persons_total"]
    assert summary["settings"]["valid_box_score"] == 0.999
    assert (summary["images_seen"], summary["failed_by_code"]) == (2, {str(EMPTY_IMAGE): 1})
    assert {p.name: p.read_bytes() for p in out.glob("*.jpg.json")} == results

    # The thresholds count only: a run with the original ones reuses every result.
    back = cli("run", str(src), "--out", str(out), "--no-progress")
    assert back.returncode == 0, back.stderr
    assert json.loads((out / "_summary.json").read_text())["valid_persons_total"] == (
        first["valid_persons_total"])
    assert (out / "people.jpg.json").read_bytes() == results["people.jpg.json"]


@pytest.mark.skipif(not AS_ROOT, reason="as a user, the odd-files table has the chmod 000 case")
def test_permission_denied_is_one_files_problem_also_when_tests_run_as_root():
    """Root reads chmod 000 files, so the check runs in a child that drops to ``nobody``."""
    import shutil
    import tempfile

    from posebatch.errors import ObjectUnreadable
    from posebatch.storage import LocalStorage

    folder = tempfile.mkdtemp(prefix="posebatch-perm-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        _chmod000(Path(folder) / "noperm.jpg")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            status = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                LocalStorage(folder).read("noperm.jpg", max_bytes=1 << 20)
            except ObjectUnreadable as err:
                status = 0 if "permission denied" in str(err) else 2
            except BaseException:  # noqa: BLE001 - any other outcome fails the test
                status = 3
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
