"""What hemaseg's two web apps share (`serve`: the HTTP API and its page; `label`: the labelling page):
the error format, the security headers every response carries, the error handlers and the API-key check.
Imported only by those apps: it needs the `[serve]` extra (FastAPI)."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

BASE_STATIC = Path(__file__).parent / "web_static"  # the pages' shared stylesheet, served at /base/

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # The pages load nothing from elsewhere; images are data: URLs built from the API's replies.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "Cross-Origin-Resource-Policy": "same-origin",  # another site may not even embed a reply as an <img>
}
# module level: FastAPI resolves the annotations of `api_key_check`'s dependency in this module's globals
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="the API key, when the service was started with one")
bearer = HTTPBearer(auto_error=False, description="the API key as a bearer token (alternative to X-API-Key)")


class ApiError(Exception):
    """A refusal the client can act on; becomes `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def mount_static(app: FastAPI, own: Path) -> None:
    """The app's own static files at /static/ and the shared stylesheet at /base/."""
    app.mount("/static", StaticFiles(directory=own), name="static")
    app.mount("/base", StaticFiles(directory=BASE_STATIC), name="base")


def install_error_handlers(app: FastAPI) -> None:
    """Every error a route raises becomes the one error format: ApiError as it says, bad parameters 422,
    unknown routes 404/405, anything else a logged 500 that says nothing of the inside."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("request %s refused: %d %s", getattr(request.state, "request_id", "-"), exc.status, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                 for e in exc.errors()]
        return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", getattr(request.state, "request_id", "-"))
        return error_response(500, "internal_error", "Something went wrong inside hemaseg; the log has details.")


def api_key_check(api_key: str | None):
    """A FastAPI dependency that lets a request through when `api_key` is None or the request carries it
    (X-API-Key or Authorization: Bearer), else a 401."""
    expected = None if api_key is None else api_key.encode("utf-8")

    async def require_key(key: Annotated[str | None, Depends(api_key_header)],
                          token: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if expected is None:
            return
        # compared as bytes in constant time: HTTP headers arrive as latin-1 text, so their raw bytes are
        # the client's UTF-8 bytes of any key, ASCII or not
        for given in (key, token.credentials if token else None):
            if given is None:
                continue
            try:
                raw = given.encode("latin-1")
            except UnicodeEncodeError:  # not from a header; compare its UTF-8 bytes
                raw = given.encode("utf-8")
            if hmac.compare_digest(raw, expected):
                return
        raise ApiError(401, "unauthorized", "This service needs an API key: send it as the X-API-Key header "
                                            "or as Authorization: Bearer <key>.",
                       headers={"WWW-Authenticate": "Bearer"})

    return require_key


MULTIPART_SLACK = 64 * 1024  # boundaries and part headers on top of the file itself


async def read_body(request: Request, limit: int, too_large: ApiError) -> bytes:
    """The request body, held in memory and refused (`too_large`) as soon as it grows past `limit` bytes
    plus MULTIPART_SLACK, whatever Content-Length claims."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + MULTIPART_SLACK:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
