"""The daemon's optional HTTP API: every operation of the table as JSON over HTTP(S).

Off by default. With ``http_listen = "ADDRESS:PORT"`` in daemon.toml the daemon serves
it on that address, with TLS when ``http_cert`` and ``http_key`` are set. Every request
needs ``Authorization: Bearer <token>``, the token read from ``http_token_file`` (default
``/etc/sharedlvm/http-token``), which must be readable by root only. A wrong token is
401 and nothing is done; malformed JSON or bad values are 400 with a message. Plain
HTTP carries the token in clear text: without TLS the API listens only on a loopback
address, unless ``http_insecure = true`` says the network is trusted
(:meth:`HttpApi.check_listen`).

The routes and the OpenAPI document (``/openapi.json``) are built from the operations
table (operations.py) and the request and result types: path parameters (``domain``,
``volume``) come from the path and only from there, other fields from the query
(GET, DELETE) or the JSON body (POST). aiohttp (asyncio) serves it in a thread of its
own; each request runs the daemon's dispatch in a worker thread, so the socket, the
mailbox and HTTP share every check. Errors become statuses here and only here
(:data:`STATUS`).

Uploads and downloads carry the image itself, so they are the two routes not built
from the table: ``POST .../volumes/upload`` takes the file as the request body
(``application/octet-stream``, with a Content-Length; the upload's other fields in the
query) and ``GET .../volumes/{volume}/content`` answers with the volume's content as
a file. Either passes through a private spool directory of this host (checked for
space first; the file removed when the request ends, whatever happens) and then runs
the same operation as ``volume upload`` and ``volume download``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import os
import re
import shutil
import ssl
import stat
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from . import codec, errors, operations
from .operations import Operation
from .qemu_img import metadata_overhead
from .requests import DownloadVolume, GetVolume, Request

log = logging.getLogger(__name__)

# Every error class and its HTTP status (a test checks that none is missing).
STATUS: dict[type[errors.Error], int] = {
    errors.Error: 500,
    errors.CommandError: 500,
    errors.CommandTimeout: 504,
    errors.InvalidArgument: 400,
    errors.NotFound: 404,
    errors.DomainNotFound: 404,
    errors.VolumeNotFound: 404,
    errors.AlreadyExists: 409,
    errors.NoSpace: 507,
    errors.NotManager: 409,
    errors.Fenced: 503,
    errors.ReadOnlyDenied: 409,
    errors.CorruptRecord: 500,
    errors.Unsupported: 501,
    errors.LvmError: 500,
    errors.ImageError: 500,
    errors.LeaseError: 500,
    errors.LeaseHeld: 409,
    errors.VolumeHeld: 409,
    errors.LockspaceError: 503,
    errors.Busy: 409,
    errors.VolumeInUse: 409,
    errors.HasChildren: 409,
    errors.ReadOnlyVolume: 409,
    errors.DaemonNotRunning: 503,
    errors.StorageIOError: 503,
    errors.MonitorError: 502,
    errors.MigrationFailed: 502,
    errors.MonitorRefused: 502,
    errors.HandoffFailed: 409,
    errors.Timeout: 504,
}


UPLOAD_PATH = "/v1/domains/{domain}/volumes/upload"
DOWNLOAD_PATH = "/v1/domains/{domain}/volumes/{volume}/content"
# Left free on the spool's file system after an upload's body (logs, the daemon).
SPOOL_RESERVE = 1024**3
TRANSFERS = 4  # uploads and downloads at once over HTTP on one host
STALL_TIMEOUT = 300  # seconds without a byte of a body, sent or received


def _reserve(fd: int, length: int) -> None:
    """The whole of an upload's spool file allocated before its body is read:
    concurrent uploads cannot overcommit the file system between them."""
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        raise errors.InvalidArgument(f"the upload ({length} bytes) does not fit on this "
                                     f"host: {exc.strerror}") from None


def status_for(exc: errors.Error) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


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


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (also as ::ffff:127.x.y.z). Names other than
    localhost are not resolved: they count as reachable from the network."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PATH_PARAM = re.compile(r"{(\w+)}")


def path_params(op: Operation) -> list[str]:
    assert op.http is not None
    return _PATH_PARAM.findall(op.http[1])


def _query_name(f: dataclasses.Field[Any]) -> str:
    flag = f.metadata.get("flag")
    return flag.lstrip("-").replace("-", "_") if flag else f.name


def _from_query(op: Operation, query: Any) -> dict[str, Any]:
    """Query parameters as wire fields: repeated options (tag=k=v) and booleans
    (1/true/yes) parsed the way the command line parses them."""
    out: dict[str, Any] = {}
    types_ = codec.hints(op.request)
    for f in dataclasses.fields(op.request):
        name = _query_name(f)
        if name not in query:
            continue
        values = query.getall(name)
        if f.metadata.get("repeat"):
            out[f.name] = f.metadata["cli_parse"](values)
        elif types_[f.name] is bool:
            out[f.name] = values[-1].lower() in ("1", "true", "yes")
        else:
            out[f.name] = values[-1]
    unknown = sorted(set(query) - {_query_name(f) for f in dataclasses.fields(op.request)})
    if unknown:
        raise errors.InvalidArgument(f"unknown query parameter(s) {', '.join(unknown)}")
    return out


class HttpApi:
    def __init__(self, dispatch: Callable[[Request], Any], render_metrics: Callable[[], str],
                 listen: str, token: str, cert: Path | None = None,
                 key: Path | None = None, insecure: bool = False,
                 spool: Path | None = None) -> None:
        self.host, self.port = self.check_listen(listen, bool(cert and key), insecure)
        self.dispatch = dispatch
        self.spool = spool
        self._copy_pool = ThreadPoolExecutor(TRANSFERS + 1, thread_name_prefix="transfer")
        self._transfers = asyncio.Semaphore(TRANSFERS)
        self.render_metrics = render_metrics
        self.token = token.encode()
        self.ssl: ssl.SSLContext | None = None
        if cert and key:
            self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.runner: web.AppRunner | None = None

    @staticmethod
    def check_listen(listen: str, tls: bool, insecure: bool) -> tuple[str, int]:
        """The host and port of ``http_listen``. Without TLS the bearer token and every
        request travel in clear text, so plain HTTP is refused on any address other
        machines can reach (an empty host or 0.0.0.0 included) unless ``insecure``
        (daemon.toml ``http_insecure``) allows it."""
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise errors.InvalidArgument(f"http_listen {listen!r}: use ADDRESS:PORT")
        host = host.strip("[]")
        if not tls and not insecure and not is_loopback(host):
            raise errors.InvalidArgument(
                f"http_listen {listen!r} is not a loopback address: set http_cert and "
                "http_key (TLS), or http_insecure = true to send the token in clear text")
        return host, int(port)

    # Routing

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=1024 * 1024)
        app.add_routes([web.get("/openapi.json", self.openapi),
                        web.get("/metrics", self.metrics)])
        if self.spool is not None:
            app.add_routes([web.post(UPLOAD_PATH, self.upload),
                            web.get(DOWNLOAD_PATH, self.download, allow_head=False)])
        for op in operations.TABLE:
            if op.http is not None:
                app.router.add_route(op.http[0], op.http[1], self._handler(op))
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # Bytes: a non-ASCII token is a wrong token (401), not a TypeError (500).
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "replace"), self.token):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except errors.Error as exc:
            return web.json_response({"error": str(exc), **exc.to_wire()},
                                     status=status_for(exc))

    def _handler(self, op: Operation) -> Handler:
        params = path_params(op)

        async def handler(request: web.Request) -> web.StreamResponse:
            fields: dict[str, Any]
            if request.method == "POST":
                fields = {}
                if request.can_read_body:
                    try:
                        data = await request.json()
                    except ValueError as exc:
                        raise errors.InvalidArgument(f"malformed JSON: {exc}") from None
                    if not isinstance(data, dict):
                        raise errors.InvalidArgument("the request body must be a JSON object")
                    fields = data
                if request.query:
                    raise errors.InvalidArgument("POST takes its fields in the JSON body")
            else:
                fields = _from_query(op, request.query)
            # The path names the object: never let a query or body key override it
            # (DELETE .../volumes/V1?volume=V2 must not delete V2).
            clash = sorted(set(fields) & set(params))
            if clash:
                raise errors.InvalidArgument(
                    f"{', '.join(clash)} is given by the path, not the query or body")
            fields.update(request.match_info)
            req = operations.decode(op.name, fields)
            result = await asyncio.get_running_loop().run_in_executor(None, self.dispatch, req)
            return web.json_response(codec.to_wire(result), status=op.http_status)
        return handler

    # Copies in and out: the image in the body

    def _copy_request(self, name: str, request: web.Request, path: Path) -> Request:
        fields = _from_query(operations.get(name), request.query)
        clash = sorted(set(fields) & ({"file"} | set(request.match_info)))
        if clash:
            raise errors.InvalidArgument(
                f"{', '.join(clash)} is given by the path or the HTTP body here, not the "
                "query")
        fields.update(request.match_info)
        fields["file"] = str(path)
        return operations.decode(name, fields)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the TRANSFERS uploads and downloads this host runs at once over HTTP;
        more are refused, not queued."""
        if self._transfers.locked():
            raise errors.Busy(f"{TRANSFERS} uploads and downloads are running on this "
                              "host: try again later")
        async with self._transfers:
            yield

    async def _in_pool(self, call: Callable[[], Any]) -> Any:
        """``call`` in the transfers' own threads, never the API's: a copy takes minutes
        and must not hold a thread every other request needs."""
        return await asyncio.get_running_loop().run_in_executor(self._copy_pool, call)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """The body spooled into a private file whose whole size is reserved first
        (fallocate: concurrent uploads cannot overcommit the file system), then
        ``volume upload`` of that file; the file is removed when the request ends,
        whatever happens."""
        assert self.spool is not None
        path = self.spool / f"upload-{uuid.uuid4()}"
        req = self._copy_request("volume.upload", request, path)  # bad input: before the body
        if "file_format" not in request.query:
            raise errors.InvalidArgument("an HTTP upload names its body's format "
                                         "(file_format=raw or qcow2): it is never probed")
        length = request.content_length
        if not length or length < 0:
            raise errors.InvalidArgument("an upload needs the image as the request body, "
                                         "with a Content-Length")
        self._check_room(length, "the upload")
        async with self._slot():
            try:
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                          "wb") as f:
                    await self._in_pool(lambda: _reserve(f.fileno(), length))
                    got = 0
                    while got < length:
                        try:
                            chunk = await asyncio.wait_for(request.content.read(1 << 20),
                                                           STALL_TIMEOUT)
                        except TimeoutError:
                            raise errors.Timeout(f"the upload's body stalled for "
                                                 f"{STALL_TIMEOUT} s") from None
                        if not chunk:
                            break
                        got += len(chunk)
                        await self._in_pool(lambda c=chunk: f.write(c))  # type: ignore[misc]
                if got != length:
                    raise errors.InvalidArgument(f"the body ended after {got} of {length} "
                                                 "bytes")
                result = await self._in_pool(lambda: self.dispatch(req))
            finally:
                path.unlink(missing_ok=True)
        return web.json_response(codec.to_wire(result), status=201)

    async def download(self, request: web.Request) -> web.StreamResponse:
        """``volume download`` into a private file (refused first unless the volume's
        whole capacity fits on this host), which is then unlinked and sent from its
        open descriptor: nothing is left behind if the client goes away, and a client
        that stops reading for STALL_TIMEOUT is dropped."""
        assert self.spool is not None
        path = self.spool / f"download-{uuid.uuid4()}"
        req = self._copy_request("volume.download", request, path)
        assert isinstance(req, DownloadVolume)
        async with self._slot():
            info = await self._in_pool(lambda: self.dispatch(
                GetVolume(req.volume, domain=req.domain)))
            self._check_room(info.capacity + metadata_overhead(info.capacity),
                             "the download")
            try:
                result = await self._in_pool(lambda: self.dispatch(req))
                f = open(path, "rb")  # noqa: SIM115 - closed below
            finally:
                path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        with f:
            size = os.fstat(f.fileno()).st_size
            response = web.StreamResponse(headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(size),
                "X-Sharedlvm-Format": result.format.value,
                "Content-Disposition":
                    f'attachment; filename="{result.volume}.{result.format.value}"'})
            await response.prepare(request)
            try:
                while chunk := await loop.run_in_executor(self._copy_pool, f.read, 1 << 20):
                    await asyncio.wait_for(response.write(chunk), STALL_TIMEOUT)
                await response.write_eof()
            except TimeoutError:
                log.warning("download of %s: the client stopped reading for %d s",
                            result.volume, STALL_TIMEOUT)
                raise
        return response

    def _check_room(self, size: int, what: str) -> None:
        """Refused unless ``size`` bytes fit in the spool, SPOOL_RESERVE left over."""
        assert self.spool is not None
        free = shutil.disk_usage(self.spool).free - SPOOL_RESERVE
        if size > free:
            raise errors.InvalidArgument(
                f"{what} ({size} bytes) does not fit on this host ({max(free, 0)} bytes "
                "free for it): use the command line with a file instead")

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        # Rendered here, not in the worker threads: those may all be waiting on a
        # stuck manager, which is when metrics matter most. Rendering reads no disk.
        text = self.render_metrics()
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(openapi())

    # Life cycle

    def start(self) -> None:
        if self.spool is not None:
            self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            # What a daemon that died mid-copy left: nobody's request any more.
            for entry in self.spool.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    entry.unlink()
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


# OpenAPI, from the table and the types

_ERROR_SCHEMA = {"type": "object", "required": ["error", "kind", "message"], "properties": {
    "error": {"type": "string", "description": "one-line message"},
    "kind": {"type": "string", "description": "error class (errors.py)"},
    "message": {"type": "string"},
    "fields": {"type": "object", "description": "the error's fields"}}}


def _operation_doc(op: Operation) -> dict[str, Any]:
    params = path_params(op)
    full = codec.schema(op.request)
    props = {k: v for k, v in full["properties"].items() if k not in params}
    required = [k for k in full.get("required", []) if k not in params]
    doc: dict[str, Any] = {
        "operationId": op.name.replace(".", "_"),
        "summary": op.summary,
        "parameters": [{"name": p, "in": "path", "required": True,
                        "schema": {"type": "string"}} for p in params],
        "responses": {
            str(op.http_status): {"description": "OK", "content": {"application/json": {
                "schema": codec.schema(op.request.Result)}}},
            "default": {"description": "an error, its HTTP status from its class",
                        "content": {"application/json": {"schema": _ERROR_SCHEMA}}},
            "401": {"description": "missing or wrong bearer token"},
        },
    }
    assert op.http is not None
    if op.http[0] == "POST":
        body: dict[str, Any] = {"type": "object", "properties": props,
                                "additionalProperties": False}
        if required:
            body["required"] = required
        doc["requestBody"] = {"required": bool(required), "content": {
            "application/json": {"schema": body}}}
    else:
        fields = {f.name: f for f in dataclasses.fields(op.request)}
        for name, schema in props.items():
            f = fields[name]
            if f.metadata.get("repeat"):
                schema = {"type": "array", "items": {"type": "string"},
                          "description": f.metadata["help"]}
            doc["parameters"].append({
                "name": _query_name(f), "in": "query", "required": name in required,
                "schema": schema, **({"explode": True} if f.metadata.get("repeat") else {})})
    return doc


def _copy_doc(name: str, path: str, status: int, body: str | None) -> dict[str, Any]:
    """An upload or download route: the operation's fields in the query, but ``file``,
    which is the body (upload) or the answer (download)."""
    op = dataclasses.replace(operations.get(name), http=("GET", path), http_status=status)
    doc = _operation_doc(op)
    doc["parameters"] = [p for p in doc["parameters"] if p["name"] != "file"]
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    if body is not None:
        doc["requestBody"] = {"required": True, "description": body, "content": binary}
    else:
        doc["responses"][str(status)] = {
            "description": "the volume's content (its chain flattened), its format in "
                           "the X-Sharedlvm-Format header", "content": binary}
    return doc


def openapi() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text metrics",
                             "responses": {"200": {"description": "OK", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}}}}},
    }
    for op in operations.TABLE:
        if op.http is not None:
            paths.setdefault(op.http[1], {})[op.http[0].lower()] = _operation_doc(op)
    paths[UPLOAD_PATH] = {"post": _copy_doc(
        "volume.upload", UPLOAD_PATH, 201,
        "the image (raw or qcow2) as the body, with a Content-Length")}
    paths[DOWNLOAD_PATH] = {"get": _copy_doc("volume.download", DOWNLOAD_PATH, 200, None)}
    return {
        "openapi": "3.0.3",
        "info": {"title": "sharedlvm host daemon", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
