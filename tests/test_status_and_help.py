"""What `status` and `--help` say (issue 21, row 12).

- The rate of a job counts the images that got a result: a job whose images all failed the input
  rules (microseconds each) printed "14000.0 img/s" on the main before this change.
- ``--precision``'s help said "auto: fp16 on a GPU" while README and code choose fp32.
A real job on redis-server, SeaweedFS and a worker process, and the real parser.
"""

from __future__ import annotations

import uuid

import pytest

from posebatch.testing.cluster import WorkerProcess, run_cli

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(("done", "failed", "expected"), [
    (14, 14, "no rate (no image succeeded)"),  # all failed in 1 ms: was 14000.0 img/s
    (14, 7, "7.0 img/s"),  # 7 results in 1 s
    (10, 0, "10.0 img/s"),
])
def test_status_rate_counts_the_images_that_got_a_result(done, failed, expected):
    from posebatch.jobstate import JobProgress
    from producer.status import describe

    seconds = 0.001 if failed == done else 1.0
    p = JobProgress(job_id="j", state="done", total=done, done=done, failed=failed,
                    submitted=True, created="", started_at=1000.0,
                    updated_at=1000.0 + seconds, finished="x", output="o")
    assert f"failed, {expected}" in describe(p)


def test_status_of_a_real_all_failed_job_gives_no_rate(redis_server, s3_server, bucket,
                                                       tmp_path):
    redis_server.start()
    env = {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url}
    client = s3_server.client()
    for i in range(14):
        client.put_object(Bucket=bucket, Key=f"in/{i:02d}.jpg", Body=b"")  # 216200 each
    worker = WorkerProcess(tmp_path, env, name=f"rate{uuid.uuid4().hex[:6]}")
    worker.start()
    try:
        job_id = run_cli("submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out/",
                         env=env).stdout.strip().splitlines()[-1]
        done = run_cli("wait", job_id, "--timeout", "120", "--no-progress", env=env,
                       check=False)
        assert done.returncode == 1, done.stdout + done.stderr
        status = run_cli("status", job_id, env=env).stdout
    finally:
        worker.stop()
    assert "14/14 images done, 14 failed, no rate (no image succeeded)" in status, status
    assert "img/s" not in status


def test_precision_help_says_what_auto_does():
    from posebatch.cli import make_argument_parser

    parser = make_argument_parser()
    for command in ("run", "worker", "serve"):
        sub = parser._subparsers._group_actions[0].choices[command]
        text = " ".join(sub.format_help().split())
        if "--precision" not in text:
            continue
        assert "fp16 on a GPU" not in text, command  # README and code: fp32 on GPUs
        assert "fp32" in text.split("auto", 1)[1], command
