"""The per-image GET and PUT through obstore (Rust) instead of boto3: a tenth of the CPU.

Why: a worker makes one GET (the image) and one PUT (its result) per image from Python threads
that share the GIL with the model's thread. boto3 spends ~2 ms of CPU in Python per request;
obstore ~0.3 ms (``bench/s3_clients.py``: 60 KB GETs and 1 KB PUTs from 16 threads against
SeaweedFS on loopback, quiet 2-core host). At 2,800 img/s that is ~11 cores of boto3 against
~1.5.

Only these two calls move: listing, multipart uploads, conditional creates, HEADs and ranged
reads stay on boto3, which does them rarely. Credentials are boto3's own (obstore asks the same
boto3 session: env vars, profiles, roles), the endpoint and addressing style those of
``s3storage.make_s3_client``. Errors become botocore ``ClientError``s with the server's status and
code (parsed from obstore's message, which carries both), so ``S3Storage._error`` maps them to
the same error tree as before; a request that got no answer stays itself (an outage there).
A key obstore cannot express (empty path segments ``a//b``, control characters) raises
``Unsupported``: the caller uses boto3 for it.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Any

from botocore.exceptions import ClientError

CLIENT_ENV = "POSEBATCH_S3_CLIENT"
"""``auto`` (default): obstore when installed; ``boto3``: boto3 for every request."""
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")


class Unsupported(Exception):
    """obstore cannot address this key; use boto3 for it."""


def wanted() -> bool:
    """Whether this process should use obstore for GETs and PUTs."""
    choice = os.environ.get(CLIENT_ENV, "auto").strip().lower()
    if choice == "boto3":
        return False
    try:
        import obstore  # noqa: F401
    except ImportError:
        if choice == "obstore":
            from posebatch.errors import ConfigError

            raise ConfigError(f"{CLIENT_ENV}=obstore but obstore is not installed: "
                              "pip install obstore, or unset it") from None
        return False
    return True


class FastS3:
    """GET and PUT of whole objects in one bucket."""

    def __init__(self, bucket: str, *, connect_timeout: float, read_timeout: float,
                 max_attempts: int) -> None:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
        from obstore.store import S3Store

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        session = boto3.session.Session()
        if session.get_credentials() is None:  # boto3 says what is missing, in its own words
            raise Unsupported("no credentials")
        options: dict[str, Any] = {"connect_timeout": f"{connect_timeout}s",
                                   "timeout": f"{read_timeout}s",
                                   "pool_max_idle_per_host": "64"}
        config: dict[str, Any] = {}
        if endpoint:
            config["endpoint"] = endpoint
            options["allow_http"] = endpoint.startswith("http://")
        else:
            config["virtual_hosted_style_request"] = True
        region = session.region_name or os.environ.get("AWS_REGION")
        if region:
            config["region"] = region
        self.store = S3Store(
            bucket, config=config, client_options=options,
            credential_provider=Boto3CredentialProvider(session),
            retry_config={"max_retries": max(0, max_attempts - 1),
                          "retry_timeout": timedelta(seconds=read_timeout)})

    def get(self, key: str, max_bytes: int | None = None) -> tuple[int, bytes | None]:
        """(size, body); the body is None when ``size`` is over ``max_bytes`` (not read)."""
        import obstore

        try:
            result = obstore.get(self.store, key)
        except ValueError as err:
            raise Unsupported(str(err)) from err
        except Exception as err:  # obstore's own tree: translated for the caller's mapping
            raise translate(err, "GetObject") from err
        size = int(result.meta["size"])
        if max_bytes is not None and size > max_bytes:
            return size, None
        try:
            return size, bytes(result.bytes())
        except Exception as err:
            raise translate(err, "GetObject") from err

    def put(self, key: str, data: bytes, content_type: str) -> None:
        import obstore

        try:
            obstore.put(self.store, key, data, attributes={"Content-Type": content_type})
        except ValueError as err:
            raise Unsupported(str(err)) from err
        except Exception as err:
            raise translate(err, "PutObject") from err


def translate(err: Exception, operation: str) -> Exception:
    """An obstore error as the botocore ClientError the server's answer would have been, or the
    error itself when no answer came (connection refused or reset, timeout)."""
    text = str(err)
    status = _STATUS.search(text)
    if status is None:
        return err
    code, message = _CODE.search(text), _MESSAGE.search(text)
    response = {"Error": {"Code": code.group(1) if code else status.group(1),
                          "Message": message.group(1) if message else ""},
                "ResponseMetadata": {"HTTPStatusCode": int(status.group(1))}}
    return ClientError(response, operation)  # type: ignore[arg-type]
