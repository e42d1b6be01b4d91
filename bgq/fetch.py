"""Images by URL: fetch with SSRF rules, a size limit and a timeout.

PLACEHOLDER with the interface of the fetch branch (FetchFailed, fetch_image, guarded_client);
that branch's module replaces this one on merge.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from bgq import defaults
from bgq.errors import InvalidRequest
from bgq.webhooks import is_public

IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class FetchFailed(InvalidRequest):
    """An image URL could not be fetched; `reason` is a short code, str() the one-line why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_url(url: str, allow_private: bool) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise FetchFailed("bad_url", f"invalid URL {url!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise FetchFailed("bad_url", f"not an http(s) URL with a host: {url!r}")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FetchFailed("dns", f"{parts.hostname!r} does not resolve: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not is_public(address):
            raise FetchFailed(
                "not_allowed",
                f"{parts.hostname!r} is a non-public address ({address}); "
                "set BGQ_FETCH_ALLOW_PRIVATE=true to allow it",
            )


def guarded_client(allow_private: bool, timeout: float, **kwargs: Any) -> httpx.Client:
    """A client for fetch_image (redirects are followed by fetch_image, each one checked)."""
    return httpx.Client(timeout=timeout, follow_redirects=False, **kwargs)


def fetch_image(
    url: str,
    *,
    allow_private: bool,
    timeout: float,
    max_bytes: int,
    client: httpx.Client | None = None,
) -> bytes:
    """The bytes at `url`, if it is a public http(s) image within `max_bytes`; else FetchFailed."""
    own = client is None
    http = client or guarded_client(allow_private, timeout)
    try:
        for _ in range(defaults.FETCH_MAX_REDIRECTS + 1):
            _check_url(url, allow_private)
            with http.stream("GET", url, timeout=timeout) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchFailed("http_status", f"{url} answered HTTP {response.status_code}")
                return _read(response, url, max_bytes)
        raise FetchFailed("redirects", f"more than {defaults.FETCH_MAX_REDIRECTS} redirects")
    except httpx.TimeoutException:
        raise FetchFailed("timeout", f"{url} did not answer within {timeout:g}s") from None
    except (httpx.InvalidURL, ValueError) as exc:
        raise FetchFailed("bad_url", f"invalid URL {url!r}: {exc}") from None
    except httpx.HTTPError as exc:
        raise FetchFailed("network", f"cannot fetch {url}: {exc}") from None
    finally:
        if own:
            http.close()


def _read(response: httpx.Response, url: str, max_bytes: int) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise FetchFailed("too_large", f"{url} is over {max_bytes} bytes")
    if not bytes(body).startswith(IMAGE_MAGIC):
        kind = response.headers.get("content-type", "unknown type")
        raise FetchFailed("not_an_image", f"{url} is not an image ({kind})")
    return bytes(body)
