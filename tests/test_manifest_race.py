"""Two runs with other settings into one new OUTPUT at the same moment (issue 21, row 6).

On the main before this change the manifest was check-then-write and a run that wrote nothing
never looked at it again: in 1 of 10 trials both runs exited 0, the manifest and every result
said one setting and ``_summary.json`` the other. Now the claim is an atomic create
(``Storage.create``: a hard link on a folder, ``If-None-Match: *`` on S3) and ``run`` checks
the manifest again at its end. Raced for real: threads behind a barrier on a real folder and a
real SeaweedFS, and two `posebatch run` processes, a bounded number of trials each.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from posebatch.errors import BAD_SIZE, ConfigError
from posebatch.manifest import MANIFEST_NAME, claim_output, manifest, read_manifest
from posebatch.settings import JobSettings
from posebatch.testing.cluster import CLI
from tests.devdata import require_model
from tests.images import jpeg

pytestmark = pytest.mark.timeout(400)

TRIALS = 10
SETTINGS = (JobSettings(imgsz=320), JobSettings(imgsz=640))


def _race_claims(dst) -> list[int]:
    """Four claims behind a barrier, two per setting; the indexes of SETTINGS that won."""
    contenders = [0, 1, 0, 1]
    barrier = threading.Barrier(len(contenders))
    won: list[int] = []
    refused: list[int] = []

    def claim(which: int) -> None:
        wanted = manifest(SETTINGS[which], "sha-of-the-model", "model")
        barrier.wait()
        try:
            claim_output(dst, wanted, force=False)
            won.append(which)
        except ConfigError:
            refused.append(which)

    threads = [threading.Thread(target=claim, args=(w,)) for w in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) + len(refused) == len(contenders)
    return won


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_concurrent_claims_of_a_new_output_have_one_winner(where, tmp_path, request):
    from posebatch.storage import open_storage

    for trial in range(TRIALS):
        if where == "s3":
            dst = open_storage(f"s3://{request.getfixturevalue('bucket')}/t{trial}/")
        else:
            dst = open_storage(str(tmp_path / f"t{trial}"))
        won = _race_claims(dst)
        assert len(set(won)) == 1, f"trial {trial}: settings {sorted(set(won))} both claimed"
        assert len(won) == 2  # the two claims that agree with the winner both pass
        current = read_manifest(dst)
        assert current["settings"]["imgsz"] == SETTINGS[won[0]].imgsz


def test_a_run_that_wrote_nothing_checks_the_manifest_at_its_end(tmp_path):
    """The interleaving of the issue, made deterministic: this run's early check passes (no
    manifest yet); then another run with other settings claims the output and writes every
    result while this one lists; this one finds every result done, writes nothing, and must
    not write a summary that names its own settings."""
    require_model()
    from posebatch.modelstore import default_model_path
    from posebatch.settings import RuntimeSettings, from_env
    from posebatch.storage import LocalStorage
    from workers.loading import select_model
    from workers.local_run import run_job

    src_dir, out = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    keys = [f"{i}.jpg" for i in range(3)]
    for k in keys:
        (src_dir / k).write_bytes(jpeg())
    other = JobSettings(imgsz=320)
    runtime = from_env(RuntimeSettings, {"intra_threads": 1})
    model = select_model(runtime).ref
    assert default_model_path(runtime.cache_dir).is_file()

    class ListedWhileAnotherRunWrites(LocalStorage):
        """The input storage; its listing lets the other run claim and finish first."""

        def iter_keys(self, *args, **kwargs):
            dst = LocalStorage(str(out))
            claim_output(dst, manifest(other, model.sha256, model.name), force=False)
            for k in keys:
                dst.write(f"{k}.json", json.dumps(
                    {"person_num": 0, "person_info": [], "log_id": 1}).encode())
            yield from super().iter_keys(*args, **kwargs)

    with pytest.raises(ConfigError, match="says this output holds results of"):
        run_job(ListedWhileAnotherRunWrites(str(src_dir)), LocalStorage(str(out)), model,
                JobSettings(imgsz=640), runtime, progress=False)
    assert not (out / "_summary.json").exists()
    assert read_manifest(LocalStorage(str(out)))["settings"]["imgsz"] == 320


def test_two_runs_with_other_settings_racing_into_one_new_output(tmp_path):
    """Real processes: one run refuses every image by size (max-image-bytes 100: each result is
    216202), the other processes them; exactly one exits 0 and the manifest, every result and
    the summary are the winner's."""
    require_model()
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.jpg").write_bytes(jpeg(64 + i, 48))
    variants = {"tiny": ("--max-image-bytes", "100"), "default": ()}
    for trial in range(TRIALS):
        out = tmp_path / f"out{trial}"
        procs = {name: subprocess.Popen(
            [*CLI, "run", str(src), "--out", str(out), "--no-progress", "--imgsz", "64",
             "--batch-size", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**__import__("os").environ, "POSEBATCH_INTRA_THREADS": "1"})
            for name, extra in variants.items()}
        codes = {name: p.wait(120) for name, p in procs.items()}
        errs = {name: p.stderr.read() for name, p in procs.items()}
        for p in procs.values():
            p.stdout.close()
            p.stderr.close()
        assert sorted(codes.values()) == [0, 3], (trial, codes, errs)
        loser = next(n for n, c in codes.items() if c == 3)
        assert "says this output holds results of" in errs[loser], errs[loser]
        winner = next(n for n, c in codes.items() if c == 0)
        limit = 100 if winner == "tiny" else JobSettings().max_image_bytes
        assert json.loads((out / MANIFEST_NAME).read_text())["settings"]["max_image_bytes"] \
            == limit
        summary = json.loads((out / "_summary.json").read_text())
        assert summary["settings"]["max_image_bytes"] == limit, (trial, winner)
        for path in sorted(Path(out).glob("*.jpg.json")):
            result = json.loads(path.read_text())
            assert (result.get("error_code") == BAD_SIZE) == (winner == "tiny"), (trial, path)
