"""The HTTP face of ``posebatch serve``: the original API's two URLs, health and metrics.

Why these shapes: clients of the original API (its SDK and code written against it) must work
unchanged, so every answer of the analysis URL is the API's JSON with HTTP 200, errors included,
exactly as the original does; tracebacks never leave the process. Query strings are never
logged: they carry access tokens, and the token URL's carries the client secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from posebatch.errors import BAD_SIZE, EMPTY_IMAGE, INTERNAL_ERROR, ImageError
from posebatch.schema import encode_result, error_result, result_failure
from workers.serve.auth import (
    SCOPE,
    TOKEN_TTL_S,
    Authority,
    BadClient,
    RateLimiter,
    TokenExpired,
    TokenInvalid,
)
from workers.serve.batcher import Batcher, Overloaded
from workers.serve.form import decode_base64, urlencoded_field
from workers.serve.metrics import Metrics

log = logging.getLogger("posebatch.serve")

ANALYSIS_PATH = "/rest/2.0/image-classify/v1/body_analysis"
TOKEN_PATH = "/oauth/2.0/token"

# The original API's codes for what is not about the image itself.
UNAVAILABLE = 2  # "Service temporarily unavailable": our overload answer
UNSUPPORTED_METHOD = 3
QPS_LIMIT = 18
INVALID_PARAM = 216100
TOKEN_INVALID = 110
TOKEN_EXPIRED = 111
MAX_FORM_FIELDS = 32
FORM_SLACK = 64 * 1024


@dataclass(frozen=True)
class ServeConfig:
    max_base64_bytes: int = 4 * 1024 * 1024
    """The API's rule: the ``image`` field is at most 4 MB after base64."""
    body_timeout_s: float = 10.0
    """Time a client has to send its whole body; a slower one is answered 408 and dropped."""

    @property
    def max_body_bytes(self) -> int:
        """Largest body that can hold a valid ``image``: URL-encoding turns each base64 char into
        at most 3 bytes (``/`` -> ``%2F``), plus room for the other fields. Bigger bodies are
        refused from their Content-Length without reading a byte of them."""
        return 3 * self.max_base64_bytes + FORM_SLACK


class BodyTimeout(Exception):
    """The client did not send its whole body within ``ServeConfig.body_timeout_s``."""


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it passes ``limit`` (chunked bodies have no length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(batcher: Batcher, authority: Authority | None, config: ServeConfig,
               metrics: Metrics) -> Starlette:
    """``authority`` None is ``--no-auth``: any token (or none) is accepted."""
    limiter = RateLimiter()

    async def analyse(request: Request) -> Response:
        started = time.perf_counter()
        status = 200
        try:
            result = await _analyse(request)
        except ClientDisconnect:  # the client went away mid-body: nobody to answer, no error
            seconds = time.perf_counter() - started
            metrics.observe_request("disconnected", seconds)
            log.info("POST %s -> client disconnected after %.1f ms", ANALYSIS_PATH,
                     seconds * 1000)
            return Response(status_code=400)
        except BodyTimeout:
            status = 408
            result = error_result(INVALID_PARAM, f"invalid param: the request body did not "
                                  f"arrive within {config.body_timeout_s:g} s")
        except Exception:  # never a traceback to the client
            log.exception("unexpected error in %s", ANALYSIS_PATH)
            result = error_result(INTERNAL_ERROR, "internal error; see the server log")
        failure = result_failure(result)
        code = 0 if failure is None else failure.code
        seconds = time.perf_counter() - started
        metrics.observe_request("body_timeout" if status == 408 else code, seconds)
        log.info("POST %s -> %s in %.1f ms", ANALYSIS_PATH, code, seconds * 1000)  # no query
        headers = {"Connection": "close"} if status == 408 else None
        return Response(encode_result(result), status_code=status, headers=headers,
                        media_type="application/json")

    async def _analyse(request: Request) -> dict[str, Any]:
        if authority is not None:
            token = request.query_params.get("access_token", "")
            if not token:
                return error_result(TOKEN_INVALID, "Access token invalid or no longer valid: "
                                    "no access_token in the URL; get one from " + TOKEN_PATH)
            try:
                key = authority.verify(token)
            except TokenExpired:
                return error_result(TOKEN_EXPIRED, "Access token expired; get a new one from "
                                    + TOKEN_PATH)
            except TokenInvalid as err:
                return error_result(TOKEN_INVALID, f"Access token invalid or no longer valid "
                                    f"({err})")
            if not limiter.allow(key):
                return error_result(QPS_LIMIT, f"Open api qps request limit reached: key "
                                    f"{key.key} is limited to {key.qps:g} requests/s")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return error_result(BAD_SIZE, f"request body is {length} bytes; the image must be "
                                f"at most {config.max_base64_bytes} bytes after base64")
        # The body is read before the request takes one of --max-queue slots, within
        # body_timeout_s: clients that send slowly (or never finish) hold a connection, never a
        # slot, so they cannot lock out everyone else; uvicorn's limit_concurrency bounds them.
        try:
            async with asyncio.timeout(config.body_timeout_s):
                load = await _read_field(request)
        except TimeoutError:
            raise BodyTimeout from None
        if isinstance(load, dict):
            return load
        try:
            with batcher.admit():
                return await batcher.analyse(load)
        except Overloaded as err:
            return error_result(UNAVAILABLE, f"Service temporarily unavailable: {err}")

    async def _read_field(request: Request) -> Callable[[], bytes] | dict[str, Any]:
        """What the decode pool runs to get the image bytes, or an error result."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                form = await request.form(max_fields=MAX_FORM_FIELDS,
                                          max_part_size=config.max_body_bytes)
            except HTTPException as err:
                if "maximum size" in str(err.detail):
                    return _too_large()
                return error_result(INVALID_PARAM, f"invalid param: cannot read the form "
                                    f"({err.detail})")
            value = form.get("image")
            if value is not None and not isinstance(value, str):  # sent as a file part
                field: bytes | None = await value.read()
            else:
                field = None if value is None else value.encode("latin-1", "replace")
            return lambda: _image_bytes(field)
        # The API's own encoding: application/x-www-form-urlencoded.
        body = await _read_body(request, config.max_body_bytes)
        if body is None:
            return _too_large()
        # Parsed in the decode pool: up to 12 MB of form is no work for the event loop.
        return lambda: _image_bytes(urlencoded_field(body, "image"))

    def _image_bytes(field: bytes | None) -> bytes:
        """Runs in the decode pool: the API's checks on the field, then base64."""
        if not field:
            raise ImageError(EMPTY_IMAGE, "image is empty: send the base64 image in the form "
                             "field 'image'")
        if len(field) > config.max_base64_bytes:
            raise ImageError(BAD_SIZE, f"image is {len(field)} bytes after base64; the limit "
                             f"is {config.max_base64_bytes}")
        return decode_base64(field)

    def _too_large() -> dict[str, Any]:
        return error_result(BAD_SIZE, f"image is larger than {config.max_base64_bytes} bytes "
                            "after base64")

    async def token(request: Request) -> Response:
        params = dict(request.query_params)
        if request.method == "POST":
            try:
                form = await request.form(max_fields=MAX_FORM_FIELDS, max_part_size=4096)
                params.update({k: v for k, v in form.items() if isinstance(v, str)})
            except HTTPException:
                pass
        metrics.observe_token()
        if params.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type",
                                 "error_description": "The authorization grant type is not "
                                 "supported; use grant_type=client_credentials"}, 400)
        if authority is None:
            return JSONResponse({"access_token": "no-auth", "expires_in": TOKEN_TTL_S,
                                 "scope": SCOPE})
        try:
            key = authority.authenticate(params.get("client_id", ""),
                                         params.get("client_secret", ""))
        except BadClient as err:
            return JSONResponse({"error": "invalid_client", "error_description": str(err)}, 401)
        return JSONResponse({"access_token": authority.issue(key),
                             "expires_in": authority.ttl_s, "scope": SCOPE})

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "pending": batcher.pending,
                             "max_pending": batcher.max_pending})

    async def metrics_page(_request: Request) -> Response:
        body, content_type = metrics.render(batcher.pending)
        return Response(body, media_type=content_type)

    async def not_found(_request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return JSONResponse({"error_code": UNSUPPORTED_METHOD,
                             "error_msg": "Unsupported openapi method"}, status)

    async def crashed(_request: Request, _exc: Exception) -> Response:
        return JSONResponse(error_result(INTERNAL_ERROR, "internal error"), 500)

    @asynccontextmanager
    async def lifespan(_app: Starlette):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    return Starlette(
        routes=[
            Route(ANALYSIS_PATH, analyse, methods=["POST"]),
            Route(TOKEN_PATH, token, methods=["GET", "POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_found, Exception: crashed},
        lifespan=lifespan,
    )
