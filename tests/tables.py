"""Count tables compared across runs: equal but for the input versions (etag, bytes), which
only `submit`'s listing records (a local `run` leaves them empty; S3 ETags are not a folder's)."""

from __future__ import annotations

from posebatch.testing.cluster import read_counts_csv


def without_versions(table: bytes) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in ("etag", "bytes")}
            for row in read_counts_csv(table)]
