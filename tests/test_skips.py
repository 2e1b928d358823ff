"""A test that lacks what it needs skips locally and fails on CI, through one function
(issue 21, "tests that can pass by skipping").

``posebatch.testing.servers.skip_or_fail`` decides for the server binaries (redis-server,
weed, openssl), the dev set, the default model, the model-build environment and chromium. On
the main before this change the dev-set tests skipped even with ``CI=true``: a CI run without the
dev set passed them untested. A unit test of each entry point: only the locator is replaced
(the dev set and the binaries are present on this machine).
"""

from __future__ import annotations

import pytest

import tests.devdata as devdata
from posebatch.testing import servers

ENTRY_POINTS = {
    "binary": lambda mp: servers.require_or_skip("no-such-binary-posebatch"),
    "dev set": lambda mp: (mp.setattr(devdata, "dev_data_dir", lambda: None),
                           devdata.require_dev_data()),
    "model": lambda mp: (mp.setenv("POSEBATCH_CACHE", "/nonexistent/posebatch-cache"),
                         devdata.require_model()),
}


@pytest.mark.parametrize("what", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(("ci", "outcome"), [
    ("true", pytest.fail.Exception), ("1", pytest.fail.Exception),
    ("", pytest.skip.Exception), (None, pytest.skip.Exception)])
def test_missing_requirement_skips_locally_and_fails_on_ci(monkeypatch, what, ci, outcome):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as info:
        ENTRY_POINTS[what](monkeypatch)
    assert info.type is outcome, info.value  # a skip here, on CI, is the bug itself
    if outcome is pytest.fail.Exception:
        assert "required on CI" in str(info.value)


def test_present_requirements_are_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert servers.require_or_skip("redis-server")
    assert (devdata.require_dev_data() / "annotations.json").is_file()
