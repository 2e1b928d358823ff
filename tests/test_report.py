"""``posebatch report`` rendered by a real browser: headless Chromium (Debian package ``chromium``,
installed by ``make test`` through ``make browser``).

The page must open from disk with no network: Chromium runs with networking features off and a
fresh profile, the screenshot must show something, and every gallery picture must load.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from posebatch.testing.servers import skip_or_fail
from tests.devdata import require_dev_data
from tests.exporthelpers import posebatch

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# Appended to a copy of the page only: the report itself has no script. After the load event it
# puts "images N broken M" in the title, which --dump-dom prints.
PROBE = ('<script>addEventListener("load",()=>{const i=[...document.images];document.title='
         '"images "+i.length+" broken "+i.filter(x=>!x.complete||x.naturalWidth===0).length;});'
         "</script>")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        skip_or_fail("chromium not found (make browser: apt-get install -y chromium)")
    return path


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for name in ("src", "href"):
            value = a.get(name) or ""
            if value.startswith(("http:", "https:", "//")):
                self.external.append(value)
        if tag == "img":
            self.images.append(a["src"] or "")
        elif tag == "a":
            self.links.append(a["href"] or "")
        elif tag in ("script", "link"):
            self.external.append(f"<{tag}>")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dev = require_dev_data() / "images"
    src = tmp_path_factory.mktemp("in")
    for sub in ("posetrack18", "mhp"):  # a crowded frame and small images: every gallery fills
        shutil.copytree(dev / sub, src / sub)
    (src / "broken.jpg").write_bytes(b"not an image" * 20)
    out = tmp_path_factory.mktemp("out")
    posebatch("run", src, "--out", out, "--no-progress")
    dest = tmp_path_factory.mktemp("report")
    posebatch("report", out, "--to", dest, "--per-gallery", "3")
    return dest


def test_report_is_self_contained_and_every_gallery_picture_exists(report):
    html = (report / "index.html").read_text(encoding="utf-8")
    links = Links()
    links.feed(html)
    assert links.external == []
    assert len(links.images) >= 6  # three galleries, none empty
    for rel in links.images + links.links:
        assert (report / rel).is_file(), rel
        with Image.open(report / rel) as im:
            assert im.format == "JPEG" and min(im.size) > 16
    for section in ("Summary", "Valid persons per image", "Mean keypoint score", "Failures",
                    "Most crowded", "Least confident", "Random sample"):
        assert section in html
    assert "216201" in html  # the broken file's failure is in the table
    assert "<svg" in html


def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    proc = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000",
                        (report / "index.html").as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1280, 2000)
        stat = ImageStat.Stat(rgb)
        assert max(stat.stddev) > 20  # not a blank page
        assert len(rgb.getcolors(maxcolors=1 << 20) or []) > 1000  # pictures, not just text
    probe = report / "probe.html"
    probe.write_text((report / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    proc = run_chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    title = proc.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    n_images = int(title.split()[1])
    assert title == f"images {n_images} broken 0" and n_images >= 6, title
