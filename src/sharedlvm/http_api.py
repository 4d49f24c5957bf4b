"""The daemon's optional HTTP API: every CLI operation as JSON over HTTP(S).

Off by default. With ``http_listen = "ADDRESS:PORT"`` in daemon.toml the daemon serves
it on that address, with TLS when ``http_cert`` and ``http_key`` are set. Every request
needs ``Authorization: Bearer <token>``, the token read from ``http_token_file`` (default
``/etc/sharedlvm/http-token``), which must be readable by root only. A wrong token is
401 and nothing is done; malformed JSON or bad values are 400 with a message.

aiohttp (asyncio) serves it in a thread of its own; each request runs the same
dispatch as the unix socket, in a worker thread, so both paths share every check.
The OpenAPI document is at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import errors

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

# The project's errors as HTTP statuses: mapped here and only here.
STATUS: list[tuple[type[errors.Error], int]] = [
    (errors.InvalidArgument, 400),
    (errors.NotFound, 404),
    (errors.AlreadyExists, 409),
    (errors.NotManager, 409),
    (errors.LeaseHeld, 409),
    (errors.Busy, 409),
    (errors.NoSpace, 507),
    (errors.Error, 500),
]


def status_for(exc: errors.Error) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def read_token(path: Path) -> str:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise errors.InvalidArgument(f"HTTP token file {path} does not exist") from None
    if info.st_uid != 0 or stat.S_IMODE(info.st_mode) & 0o077:
        raise errors.InvalidArgument(f"HTTP token file {path} must be owned by root and "
                                     "readable by root only (chmod 600)")
    token = path.read_text().strip()
    if len(token) < 16:
        raise errors.InvalidArgument(f"HTTP token in {path} is too short (16+ characters)")
    return token


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpApi:
    def __init__(self, daemon: Daemon, listen: str, token: str,
                 cert: Path | None = None, key: Path | None = None) -> None:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise errors.InvalidArgument(f"http_listen {listen!r}: use ADDRESS:PORT")
        self.daemon = daemon
        self.host, self.port = host.strip("[]"), int(port)
        self.token = token
        self.ssl: ssl.SSLContext | None = None
        if cert and key:
            self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.runner: web.AppRunner | None = None

    # Routing

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=1024 * 1024)
        d = "/v1/domains/{domain}"
        app.add_routes([
            web.get("/openapi.json", self.openapi),
            web.get("/v1/status", self._op("status")),
            web.get("/metrics", self.metrics),
            web.get(f"{d}/volumes", self.list_volumes),
            web.post(f"{d}/volumes", self._op("volume.create", body=True, created=True)),
            web.get(f"{d}/volumes/{{volume}}", self.volume_info),
            web.post(f"{d}/volumes/{{volume}}/extend", self._op("volume.extend", body=True)),
            web.delete(f"{d}/volumes/{{volume}}", self._op("volume.delete", query=True)),
            web.post(f"{d}/volumes/{{volume}}/prepare", self._op("volume.prepare", body=True)),
            web.post(f"{d}/volumes/{{volume}}/teardown", self._op("volume.teardown")),
            web.get(f"{d}/manager", self._op("manager.status")),
            web.post(f"{d}/manager/release", self._op("manager.release")),
            web.get(f"{d}/hosts", self._op("host.list")),
        ])
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), self.token):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except errors.Error as exc:
            return web.json_response({"error": str(exc), "kind": type(exc).__name__},
                                     status=status_for(exc))

    async def _run(self, op: str, args: dict[str, Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            None, self.daemon.dispatch, op, args)

    def _op(self, op: str, body: bool = False, query: bool = False,
            created: bool = False) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            args: dict[str, Any] = dict(request.match_info)
            if body and request.can_read_body:
                try:
                    data = await request.json()
                except ValueError as exc:
                    raise errors.InvalidArgument(f"malformed JSON: {exc}") from None
                if not isinstance(data, dict):
                    raise errors.InvalidArgument("the request body must be a JSON object")
                args.update({k: v for k, v in data.items() if not k.startswith("_")})
            if query:
                for key, value in request.query.items():
                    args[key] = value.lower() in ("1", "true", "yes") if key == "wipe" else value
            _coerce(args)
            result = await self._run(op, args)
            return web.json_response(result, status=201 if created else 200)
        return handler

    async def list_volumes(self, request: web.Request) -> web.StreamResponse:
        from . import tags
        from . import volume as volume_mod

        service = self.daemon.service(request.match_info["domain"])
        user_tags = [tags.parse_user_tag(t) for t in request.query.getall("tag", [])]
        found = await asyncio.get_running_loop().run_in_executor(
            None, lambda: volume_mod.list_volumes(service.domain, request.query.get("image"),
                                                  user_tags))
        return web.json_response([v.as_dict() for v in found])

    async def volume_info(self, request: web.Request) -> web.StreamResponse:
        from . import volume as volume_mod

        service = self.daemon.service(request.match_info["domain"])
        info = await asyncio.get_running_loop().run_in_executor(
            None, volume_mod.get_volume, service.domain, request.match_info["volume"])
        return web.json_response(info.as_dict())

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=self.daemon.render_metrics(),
                            content_type="text/plain", charset="utf-8")

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(OPENAPI)

    # Life cycle

    def start(self) -> None:
        threading.Thread(target=self._serve, name="http", daemon=True).start()
        if not self.ready.wait(10):
            raise errors.Error(f"HTTP API did not start on {self.host}:{self.port}")

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app(), access_log=log)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl)
        self.loop.run_until_complete(site.start())
        log.info("HTTP API on %s://%s:%d", "https" if self.ssl else "http", self.host,
                 self.port)
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _coerce(args: dict[str, Any]) -> None:
    """JSON values the unix socket takes as they are; HTTP callers may send sizes as
    text ("10G") for create."""
    from .units import parse_size

    size = args.get("size")
    if isinstance(size, str) and "volume" not in args:
        args["size"] = parse_size(size)
    if "tags" in args and isinstance(args["tags"], dict):
        args["tags"] = [[str(k), str(v)] for k, v in args["tags"].items()]


def _op_doc(summary: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "OK"}, "400": {"description": "bad input"},
        "401": {"description": "missing or wrong token"},
        "404": {"description": "unknown domain or volume"},
        "409": {"description": "not possible now (lease held, busy)"}}}
    if body:
        doc["requestBody"] = {"content": {"application/json": {"schema": {
            "type": "object", "properties": body}}}}
    return doc


_D = "/v1/domains/{domain}"
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "sharedlvm host daemon", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
    "paths": {
        "/v1/status": {"get": _op_doc("domains attached here, lockspace and role")},
        "/metrics": {"get": _op_doc("Prometheus text metrics")},
        f"{_D}/volumes": {
            "get": _op_doc("list volumes (query: image, tag=key=value)"),
            "post": _op_doc("create a volume (any host: forwarded to the manager)", {
                "size": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
                "format": {"type": "string", "enum": ["raw", "qcow2"]},
                "alloc": {"type": "string", "enum": ["preallocated", "thin"]},
                "image": {"type": "string"}, "tags": {"type": "object"},
                "request_id": {"type": "string"}}),
        },
        f"{_D}/volumes/{{volume}}": {
            "get": _op_doc("one volume"),
            "delete": _op_doc("delete (query: wipe, request_id)"),
        },
        f"{_D}/volumes/{{volume}}/extend": {"post": _op_doc("grow", {
            "size": {"type": "string", "example": "+2G"}, "request_id": {"type": "string"}})},
        f"{_D}/volumes/{{volume}}/prepare": {"post": _op_doc(
            "hold the lease in the daemon, activate, return the path",
            {"shared": {"type": "boolean"}})},
        f"{_D}/volumes/{{volume}}/teardown": {"post": _op_doc("deactivate, release")},
        f"{_D}/manager": {"get": _op_doc("manager host and generation")},
        f"{_D}/manager/release": {"post": _op_doc("give the manager role up")},
        f"{_D}/hosts": {"get": _op_doc("hosts, their state and what they hold")},
    },
}
