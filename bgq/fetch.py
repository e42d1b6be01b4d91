"""Fetching by URL safely (image fetches, webhook deliveries): address rules, limits, timeouts.

A `guarded_client` resolves each host once, checks every address and connects to a checked one,
so DNS cannot move a request between check and connection; TLS and Host keep the name.
"""

from __future__ import annotations

import contextvars
import http.cookiejar
import io
import ipaddress
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import httpcore
import httpx
from PIL import Image

from bgq import defaults
from bgq.errors import InvalidRequest

if TYPE_CHECKING:
    from bgq.settings import Settings

Reason = Literal[
    "dns",
    "not_allowed",
    "http_status",
    "timeout",
    "too_large",
    "not_an_image",
    "bad_url",
    "network",
    "redirects",
]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))  # RFC 8215
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
TRANSPORT_OPTIONS = ("verify", "cert", "limits")  # options of the connection pool
UNGUARDED_OPTIONS = ("transport", "mounts", "proxy", "trust_env")  # would bypass the backend
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's

NO_COOKIES = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))

# When a fetch must end (time.monotonic()); every read and connect of this thread stops there.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


class FetchFailed(InvalidRequest):
    """An image URL could not be fetched; str(exc) says why in one line."""

    reason: Reason

    def __init__(self, message: str, reason: Reason) -> None:
        super().__init__(message, reason)  # both in args: pickling and Celery rebuild it
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


def is_public(address: Address) -> bool:
    """A global unicast address, also for IPv4 embedded in IPv6 (mapped, 6to4, NAT64)."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:  # fec0::/10: deprecated, but still routed inside some sites
            return False
        embedded = address.ipv4_mapped or address.sixtofour
        if any(address in net for net in NAT64) or address in IPV4_COMPATIBLE:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public(embedded):
            return False
    return True


def resolve(host: str, port: int, allow_private: bool, timeout: float | None = None) -> list[str]:
    """Every address `host` resolves to, each checked; FetchFailed "dns" or "not_allowed".

    The lookup runs in a thread of its own so that `timeout` bounds it (getaddrinfo has no
    timeout); one that takes longer is "timeout" and finishes in the background.
    """
    try:
        addresses = lookup(host, port, timeout)
    except (OSError, UnicodeError) as exc:
        raise FetchFailed(f"{host}: does not resolve ({exc})", "dns") from None
    refused = None if allow_private else first_non_public(addresses)
    if refused is not None:
        raise FetchFailed(f"{host}: {refused} is not a public address", "not_allowed")
    if not addresses:
        raise FetchFailed(f"{host}: does not resolve (no address)", "dns")
    return addresses


def lookup(host: str, port: int, timeout: float | None = None) -> list[str]:
    """The addresses `host` resolves to, each once (OSError if it does not resolve)."""
    return list(dict.fromkeys(str(info[4][0]) for info in _getaddrinfo(host, port, timeout)))


def first_non_public(addresses: Iterable[str]) -> Address | None:
    """The first of `addresses` that `is_public` refuses (a scope suffix ignored), if any."""
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        if not is_public(address):
            return address
    return None


def _getaddrinfo(host: str, port: int, timeout: float | None) -> list[Any]:
    """socket.getaddrinfo, given up on after `timeout` seconds (FetchFailed "timeout")."""
    answer: list[Any] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller
            answer.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, name="bgq-dns", daemon=True).start()
    if not done.wait(timeout):
        raise FetchFailed(f"{host}: DNS took longer than {timeout:g} s", "timeout")
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return list(answer[0])


def _remaining(timeout: float | None, expired: type[Exception]) -> float | None:
    """`timeout`, cut to what is left of this thread's fetch; raise `expired` once none is."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the whole fetch's time is up")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose reads, writes and TLS handshake stop at the fetch's deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self.stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, _remaining(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, _remaining(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = _remaining(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self.stream.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> Any:
        return self.stream.get_extra_info(info)


class GuardedBackend(httpcore.SyncBackend):
    """Resolves a host once, refuses non-public addresses, and connects to a checked one."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        error: Exception = httpcore.ConnectError(f"{host}: no address to connect to")
        dns_timeout = _remaining(timeout, httpcore.ConnectTimeout)
        for address in resolve(host, port, self.allow_private, dns_timeout):
            left = _remaining(timeout, httpcore.ConnectTimeout)
            try:  # a numeric address: connecting resolves nothing again
                stream = super().connect_tcp(address, port, left, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            return DeadlineStream(stream)
        raise error


class GuardedClient(httpx.Client):
    """An httpx.Client whose every connection goes through a GuardedBackend."""

    allow_private: bool


def guarded_client(allow_private: bool, timeout: float, **kwargs: Any) -> httpx.Client:
    """A reusable client (thread-safe, pooled) whose every connection obeys the address rule."""
    if refused := [key for key in UNGUARDED_OPTIONS if key in kwargs]:
        raise TypeError(f"guarded_client() cannot take {', '.join(refused)}")
    pool_options = {key: kwargs.pop(key) for key in TRANSPORT_OPTIONS if key in kwargs}
    transport = httpx.HTTPTransport(trust_env=False, **pool_options)
    limits = pool_options.get("limits", DEFAULT_LIMITS)
    # httpx has no option for a network backend: give its transport a pool that has ours. The
    # CA bundle may still come from SSL_CERT_FILE/SSL_CERT_DIR; proxies never from the environment.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(
            verify=pool_options.get("verify", True), cert=pool_options.get("cert")
        ),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardedBackend(allow_private),
    )
    kwargs.setdefault("max_redirects", defaults.FETCH_MAX_REDIRECTS)
    kwargs.setdefault("cookies", NO_COOKIES)  # one receiver's must not ride along to another
    client = GuardedClient(transport=transport, trust_env=False, timeout=timeout, **kwargs)
    client.allow_private = allow_private
    return client


def check_url(url: str | httpx.URL) -> httpx.URL:
    """`url` parsed if it is http(s) with a host and no credentials; else FetchFailed "bad_url"."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise FetchFailed(f"not a valid URL: {exc}", "bad_url") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise FetchFailed("only http:// and https:// URLs with a host can be fetched", "bad_url")
    if not 0 < (parsed.port or 80) < 65536:
        raise FetchFailed(f"{parsed.host}: port {parsed.port} is out of range", "bad_url")
    if parsed.userinfo:
        raise FetchFailed(f"{parsed.host}: credentials in the URL are not allowed", "bad_url")
    return parsed


def fetch_setting_image(settings: Settings, url: str, client: httpx.Client | None = None) -> bytes:
    """An image URL fetched under the settings: BGQ_FETCH_ALLOW_PRIVATE, BGQ_FETCH_TIMEOUT and
    BGQ_MAX_UPLOAD_MB (the API, `bgq submit` and ingest all fetch through here)."""
    return fetch_image(
        url,
        allow_private=settings.fetch_allow_private,
        timeout=settings.fetch_timeout,
        max_bytes=settings.max_upload_bytes,
        client=client,
    )


def fetch_image(
    url: str,
    *,
    allow_private: bool,
    timeout: float,
    max_bytes: int,
    client: httpx.Client | None = None,
) -> bytes:
    """The image at `url`, every hop checked, within `timeout` seconds in all; else FetchFailed."""
    target = check_url(url)
    if client is not None and getattr(client, "allow_private", None) is not allow_private:
        raise ValueError(f"client must be a guarded_client(allow_private={allow_private})")
    deadline = time.monotonic() + timeout
    http = client or guarded_client(allow_private, timeout)
    token = _deadline.set(deadline)
    try:
        with _failures(target.host, timeout):
            data = _follow(http, target, deadline, max_bytes)
    finally:
        _deadline.reset(token)
        if client is None:
            http.close()
    if not looks_like_image(data):
        raise FetchFailed(f"{target.host}: not an image ({len(data)} bytes)", "not_an_image")
    return data


@contextmanager
def _failures(host: str, timeout: float) -> Iterator[None]:
    """httpx's errors as FetchFailed naming `host` (never the URL: it may hold secrets)."""
    try:
        yield
    except FetchFailed as exc:
        if exc.reason != "not_allowed":
            raise
        raise FetchFailed(f"{exc}; BGQ_FETCH_ALLOW_PRIVATE=true allows it", exc.reason) from None
    except httpx.TimeoutException:
        raise FetchFailed(f"{host}: took longer than {timeout:g} s", "timeout") from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise FetchFailed(f"{host}: bad URL ({exc})", "bad_url") from None
    except httpx.HTTPError as exc:
        raise FetchFailed(f"{host}: {type(exc).__name__}: {exc}", "network") from None


def _follow(http: httpx.Client, url: httpx.URL, deadline: float, max_bytes: int) -> bytes:
    """GET `url`, following at most FETCH_MAX_REDIRECTS redirects, and read the body."""
    request = http.build_request("GET", url, headers={"Accept-Encoding": "identity"})
    for _ in range(defaults.FETCH_MAX_REDIRECTS + 1):
        left = deadline - time.monotonic()
        if left <= 0:
            raise httpx.TimeoutException("no time left for the next hop")
        request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), left)
        response = http.send(request, stream=True, follow_redirects=False)
        try:
            if response.next_request is None:
                return _body(response, deadline, max_bytes)
            request = response.next_request
            check_url(request.url)
        finally:
            response.close()
    raise FetchFailed(
        f"{url.host}: more than {defaults.FETCH_MAX_REDIRECTS} redirects", "redirects"
    )


def _body(response: httpx.Response, deadline: float, max_bytes: int) -> bytes:
    """A 2xx response's body, at most `max_bytes` of it, read by `deadline`; else FetchFailed."""
    host = response.request.url.host
    if not response.is_success:
        why = f"HTTP status {response.status_code} {response.reason_phrase}".rstrip()
        raise FetchFailed(f"{host}: {why}", "http_status")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise FetchFailed(f"{host}: {length} bytes, over the limit of {max_bytes}", "too_large")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise FetchFailed(f"{host}: over the limit of {max_bytes} bytes", "too_large")
        if time.monotonic() > deadline:  # a server that drips bytes (a stalled one: the stream)
            raise httpx.TimeoutException("the body came too slowly")
        chunks.append(chunk)
    return b"".join(chunks)


def looks_like_image(data: bytes) -> bool:
    """Whether Pillow recognises the header of `data` as an image (no pixel is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)):
                return True
    except Image.DecompressionBombError:
        return True  # an image; how many pixels are allowed is the producer's to say
    except (OSError, SyntaxError, ValueError):
        return False
