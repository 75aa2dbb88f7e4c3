"""A forward HTTP proxy on 127.0.0.1 that connects only where the address guard allows: for yt-dlp.

yt-dlp makes its own requests (the page, its redirects, whatever an extractor fetches)
with its own HTTP client, so checking a page's host before handing it over leaves every
later hop unguarded. Given this proxy (yt-dlp's `proxy` option), yt-dlp sends each of its
requests here: a CONNECT for https (TLS stays end to end) and an absolute-form request
for http. The proxy opens every upstream connection through
`netguard.guarded_socket_factory`, so each hop is checked at the address it connects to,
exactly as the fetcher's are; a refusal is answered 403 and recorded in `refused`.

It serves one request per client connection (it asks the server to close after the
response), so a kept-alive connection can never carry a second request to another host.
It runs on its own event loop in a thread for as long as its `with` block.

yt-dlp reads a page whole and has no deadline of its own beyond a per-read timeout, so a
page trickling a byte a second would hold a crawl for good and an endless one would be
buffered without bound. One proxy serves one page (or one search), and is its budget: at
most `max_bytes` relayed from servers in all, and `total_s` from the start of the `with`
block. Past either, every open connection is closed and every new one answered 504, so
yt-dlp fails at once; `exceeded` says which limit ended it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from types import TracebackType
from typing import Callable
from urllib.parse import urlsplit

import aiohappyeyeballs

from crawler.netguard import AllowList, connecting_to, guarded_socket_factory

_CHUNK = 64 * 1024
#: Request headers that concern the proxy hop or the connection, not the server.
_HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization"})


class BadRequest(ValueError):
    """The client's request head is not one this proxy forwards."""


class GuardProxy:
    """`with GuardProxy(allow, timeout_s) as proxy:` yt-dlp's `proxy=proxy.url` inside the block."""

    def __init__(self, allow: AllowList, timeout_s: float, max_bytes: int | None = None,
                 total_s: float | None = None) -> None:
        """`timeout_s`: for each connection's request head and upstream connect; `max_bytes`: bytes relayed
        from servers, all connections together; `total_s`: the whole block's time (None: no limit)."""
        self.allow = allow
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.total_s = total_s
        self.url = ""
        #: Why each refused connection was refused (the guard's messages), in order.
        self.refused: list[str] = []
        #: Why the proxy stopped relaying ("timeout: ..." or "too_large: ..."), or None.
        self.exceeded: str | None = None
        self.relayed = 0
        self._handlers: set[asyncio.Task] = set()
        self._factory = guarded_socket_factory(allow)
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="crawler-guard-proxy", daemon=True)

    def __enter__(self) -> "GuardProxy":
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            raise self._failure
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # raised in the caller's thread by __enter__
            self._failure = exc
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        async with server:
            host, port = server.sockets[0].getsockname()[:2]
            self.url = f"http://{host}:{port}"
            self._started.set()
            try:
                async with asyncio.timeout(self.total_s):
                    await self._stop.wait()
            except TimeoutError:
                self._give_up(f"timeout: no complete answer within {self.total_s}s")
                await self._stop.wait()

    def _give_up(self, reason: str) -> None:
        """Stop relaying for good: close every open connection (their handlers are cancelled)."""
        if self.exceeded is None:
            self.exceeded = reason
        for task in self._handlers:
            task.cancel()

    async def _handle(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        if self.exceeded is not None:
            _reply(client_out, 504, f"the page's budget is spent ({self.exceeded})")
            client_out.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            async with asyncio.timeout(self.timeout_s):
                head = await client_in.readuntil(b"\r\n\r\n")
                host, port, forward = _parse_head(head)
                upstream = await self._connect(host, port)
            if upstream is None:
                _reply(client_out, 403, f"refused by the crawler's address guard: {self.refused[-1]}")
                return
            server_in, server_out = await asyncio.open_connection(sock=upstream)
            if forward is None:
                client_out.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                server_out.write(forward)
            await _splice(client_in, server_out, server_in, client_out, self._count)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client left, or sent a head larger than the reader's limit
        except ValueError as exc:  # BadRequest, or a host name IDNA cannot encode
            _reply(client_out, 400, str(exc))
        except OSError as exc:  # DNS failure, connection refused, timeout (TimeoutError is one)
            _reply(client_out, 502, f"{type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            pass  # the proxy is closing (Python 3.11's streams log a handler that ends cancelled as an error)
        finally:
            self._handlers.discard(task)
            client_out.close()

    def _count(self, n: int) -> None:
        """`n` more bytes from a server: past `max_bytes` in all, the proxy gives up."""
        self.relayed += n
        if self.max_bytes is not None and self.relayed > self.max_bytes:
            self._give_up(f"too_large: more than {self.max_bytes} bytes")

    async def _connect(self, host: str, port: int) -> socket.socket | None:
        """A socket connected to an allowed address of `host`, or None when the guard refused them all."""
        with connecting_to(host) as destination:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
                return await aiohappyeyeballs.start_connection(infos, socket_factory=self._factory)
            except OSError:
                if not destination.refused:
                    raise
                self.refused.extend(destination.refused)
                return None


def _parse_head(head: bytes) -> tuple[str, int, bytes | None]:
    """(host, port, what to send upstream): None for a CONNECT tunnel, else the request in origin form."""
    request_line, _, headers = head.partition(b"\r\n")
    try:
        method, target, version = request_line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(f"malformed request line {request_line[:200]!r}") from None
    if method == "CONNECT":
        parts = urlsplit(f"//{target}")
        forward = None
    else:
        parts = urlsplit(target)
        if parts.scheme != "http":
            raise BadRequest(f"only absolute http URLs and CONNECT are proxied, not {target[:200]!r}")
        path = parts.path or "/"
        kept = [line for line in headers.split(b"\r\n")
                if line and line.split(b":", 1)[0].strip().lower() not in _HOP_HEADERS]
        request = f"{method} {path}{'?' + parts.query if parts.query else ''} {version}".encode("ascii")
        forward = b"\r\n".join([request, *kept, b"Connection: close", b"", b""])
    try:
        host, port = parts.hostname, parts.port or (443 if forward is None else 80)
    except ValueError:
        raise BadRequest(f"bad port in {target[:200]!r}") from None
    if not host:
        raise BadRequest(f"no host in {target[:200]!r}")
    return host, port, forward


async def _splice(client_in: asyncio.StreamReader, server_out: asyncio.StreamWriter,
                  server_in: asyncio.StreamReader, client_out: asyncio.StreamWriter,
                  count: Callable[[int], None]) -> None:
    """Copy both ways until either side is done, then close the upstream connection; `count` sees what servers send."""
    copies = [asyncio.create_task(_copy(client_in, server_out)),
              asyncio.create_task(_copy(server_in, client_out, count))]
    try:
        await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for copy in copies:
            copy.cancel()
        server_out.close()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                count: Callable[[int], None] | None = None) -> None:
    try:
        while chunk := await source.read(_CHUNK):
            if count is not None:
                count(len(chunk))
            sink.write(chunk)
            await sink.drain()
    except ConnectionError:
        pass


def _reply(client_out: asyncio.StreamWriter, status: int, text: str) -> None:
    body = text.encode("utf-8", "replace")
    reason = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway", 504: "Gateway Timeout"}[status]
    client_out.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii") + body)
