"""Symbolic links to folders, link loops and folders named like images inside INPUT (issue 21,
row 2).

The rule (README, Input rules; ``posebatch.storage._Folders``): a link to a folder is followed
once, every folder entered is remembered by (st_dev, st_ino), so no image is listed twice and no
loop is walked forever; a link into INPUT itself or to a folder that holds the link is not
followed (its images are listed under their real path); a dangling link or a link loop is a
file, and named like an image it gets 216200. A folder named ``album.jpg`` is a folder.
On the main before this change `run` exited 70 (IsADirectoryError from the sniff of an
extensionless link to a folder), a link named ``album.jpg`` got 282000 "Is a directory", and
the images behind a link were never processed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from posebatch.errors import EMPTY_IMAGE
from posebatch.testing.cluster import CLI, read_counts_csv
from tests.images import jpeg

pytestmark = pytest.mark.timeout(300)

# What the tree holds (made by ``make_tree``), and what the listing must say:
# key -> None (an ok result) or (error code, words in its message).
EXPECTED: dict[str, tuple[int, str] | None] = {
    "sub/a.jpg": None,  # a real folder; "inside" -> sub is not followed: a.jpg once
    "album.jpg/b.jpg": None,  # a link named like an image, to a folder outside INPUT
    "real.jpg/c.jpg": None,  # a real folder named like an image
    "loop.jpg": (EMPTY_IMAGE, "symbolic link loop"),
    "dangling.jpg": (EMPTY_IMAGE, "which does not exist"),
    "photos/b2.jpg": None,  # an extensionless link to another outside folder
    "photos/nested/n.jpg": None,
}


def make_tree(tmp: Path) -> Path:
    root, outside, other = tmp / "in", tmp / "outside", tmp / "other"
    for folder in (root / "sub", root / "real.jpg", outside, other / "nested"):
        folder.mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(jpeg())
    (root / "real.jpg" / "c.jpg").write_bytes(jpeg())
    (outside / "b.jpg").write_bytes(jpeg())
    (other / "b2.jpg").write_bytes(jpeg())
    (other / "nested" / "n.jpg").write_bytes(jpeg())
    os.symlink(root / "sub", root / "inside")  # into INPUT: listed under sub/ only
    os.symlink(outside, root / "album.jpg")  # followed, first in listing order
    os.symlink(outside, root / "second")  # the same folder again: not followed twice
    os.symlink(other, root / "photos")  # extensionless link to a folder: followed
    os.symlink("..", root / "sub" / "up")  # a loop to INPUT
    os.symlink(outside, outside / "self")  # a loop inside a followed folder
    os.symlink(root, other / "back")  # from outside back into INPUT
    os.symlink(other, other / "nested" / "again")  # a loop to an ancestor
    os.symlink("loop.jpg", root / "loop.jpg")  # a link loop named like an image
    os.symlink("loop", root / "loop")  # an extensionless link loop: not an image
    os.symlink("gone.jpg", root / "dangling.jpg")
    os.symlink("gone", root / "dangling")  # extensionless and dangling: not an image
    return root


def test_listing_follows_each_folder_once_and_never_loops(tmp_path):
    from posebatch.selection import select_keys
    from posebatch.storage import LocalStorage

    root = make_tree(tmp_path)
    keys = list(select_keys(LocalStorage(str(root))))
    assert sorted(keys) == sorted(EXPECTED)  # each image once, none behind a loop
    assert len(keys) == len(set(keys))


def test_run_gives_each_link_its_outcome_and_exit_0(tmp_path):
    root = make_tree(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, "run", str(root), "--out", str(out), "--no-progress",
                           "--imgsz", "256"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    rows = {r["key"]: r for r in read_counts_csv((out / "_counts.csv").read_bytes())}
    assert sorted(rows) == sorted(EXPECTED)
    for key, outcome in EXPECTED.items():
        if outcome is None:
            assert rows[key]["status"] == "ok", rows[key]
            assert (out / f"{key}.json").is_file()
        else:
            code, words = outcome
            assert rows[key]["error_code"] == str(code), rows[key]
            assert words in rows[key]["error_msg"], rows[key]


def test_a_folder_named_as_a_key_is_no_image_data_not_an_internal_error(tmp_path):
    """An explicit key (``--keys-from``) that names a folder: 216200 "is a directory", the
    same class as a FIFO named like an image (was 282000 "Is a directory")."""
    root = make_tree(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, "run", str(root), "--out", str(out), "--no-progress",
                           "--imgsz", "256", "--keys-from", "-"], input="real.jpg\nsub/a.jpg\n",
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["key"]: r for r in read_counts_csv((out / "_counts.csv").read_bytes())}
    assert rows["sub/a.jpg"]["status"] == "ok"
    assert rows["real.jpg"]["error_code"] == str(EMPTY_IMAGE), rows["real.jpg"]
    assert "is a directory, not a regular file" in rows["real.jpg"]["error_msg"]
