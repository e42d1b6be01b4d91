"""Webhook rules shared by the API (which accepts callback URLs) and the workers (which POST).

Receivers verify a delivery with `verify(secret, body, headers["X-Bgq-Signature"])`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from urllib.parse import urlsplit

from bgq import defaults
from bgq.errors import InvalidRequest

SIGNATURE_HEADER = defaults.WEBHOOK_SIGNATURE_HEADER
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class CallbackUnresolvable(InvalidRequest):
    """The callback host does not resolve (maybe only for now: a worker retries)."""


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address, also for IPv4 embedded in IPv6 (mapped, 6to4, NAT64)."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if address in NAT64 or address in IPV4_COMPATIBLE:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public(embedded):
            return False
    return True


EVENT_HEADER = "X-Bgq-Event"  # job.done or job.failed


def sign(secret: str, body: bytes) -> str:
    """The signature header value: `sha256=` + hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str | None) -> bool:
    """True when `signature` (the header's value) signs `body` under `secret`."""
    return signature is not None and hmac.compare_digest(sign(secret, body), signature)


def check_callback_url(url: str, allow_private: bool = False) -> str:
    """Return `url` if bgq may POST to it, else raise InvalidRequest saying why.

    Only http(s) URLs; unless allow_private, every address the host resolves to must be a
    public one (no loopback, private, link-local, multicast or reserved range), so that a
    caller cannot make the workers reach into their own network.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"callback_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("callback_url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise InvalidRequest("callback_url must not carry credentials")
    if allow_private:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise CallbackUnresolvable(
            f"callback_url host {parts.hostname!r} does not resolve: {exc}"
        ) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not is_public(address):
            raise InvalidRequest(
                f"callback_url host {parts.hostname!r} is a non-public address ({address}); "
                "set BGQ_WEBHOOK_ALLOW_PRIVATE=true to allow it"
            )
    return url
