"""Settings come from defaults, POSEBATCH_* variables and flags, in that order, and are checked."""

from __future__ import annotations

import pytest

from posebatch.errors import ConfigError
from posebatch.settings import JobSettings, RuntimeSettings, from_env


@pytest.mark.parametrize(("env", "overrides", "expected", "error"), [
    ({}, {}, {"imgsz": 640, "rect": False}, None),
    ({"POSEBATCH_IMGSZ": "960"}, {}, {"imgsz": 960}, None),
    ({"POSEBATCH_IMGSZ": "960"}, {"imgsz": 320}, {"imgsz": 320}, None),
    ({"POSEBATCH_RECT": "yes"}, {}, {"rect": True}, None),
    ({"POSEBATCH_IMGSZ": "big"}, {}, None, "POSEBATCH_IMGSZ: expected int, got 'big'"),
    ({"POSEBATCH_RECT": "maybe"}, {}, None, "expected true or false"),
    ({}, {"imgsz": 100}, None, "imgsz must be a multiple of 32"),
    ({}, {"det_conf": 1.5}, None, "det_conf must be in"),
])
def test_job_settings_from_env_and_flags(env, overrides, expected, error):
    if error:
        with pytest.raises(ConfigError, match=error):
            from_env(JobSettings, overrides, env=env)
        return
    job = from_env(JobSettings, overrides, env=env)
    for name, value in expected.items():
        assert getattr(job, name) == value


def test_runtime_settings_reject_unknown_provider():
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or tensorrt, got 'tpu'"):
        from_env(RuntimeSettings, {"providers": "tpu"}, env={})


def test_job_settings_round_trip_through_a_dict():
    job = JobSettings(imgsz=960, valid_box_score=0.05)
    assert JobSettings.from_dict(job.to_dict()) == job
    with pytest.raises(ConfigError, match="unknown job settings"):
        JobSettings.from_dict({"imgsz": 640, "bogus": 1})


def test_io_threads_auto_is_one_per_core_for_folders_and_four_for_s3(monkeypatch):
    import os

    rt = RuntimeSettings()
    assert rt.io_threads == 0 and rt.io_threads_for(local=False) == 4
    for cores, want in ((1, 2), (2, 2), (3, 3), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert rt.io_threads_for(local=True) == want
    assert RuntimeSettings(io_threads=7).io_threads_for(local=True) == 7
    with pytest.raises(ConfigError, match="io_threads"):
        RuntimeSettings(io_threads=-1)
