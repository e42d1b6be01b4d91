"""Webhook rules shared by the API (which accepts callback URLs) and the workers (which POST).

Receivers verify a delivery with `verify(secret, body, headers["X-Bgq-Signature"])`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from urllib.parse import urlsplit

from bgq import defaults
from bgq.errors import InvalidRequest
from bgq.fetch import first_non_public, lookup

SIGNATURE_HEADER = defaults.WEBHOOK_SIGNATURE_HEADER

_PORT = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
_H16 = "[0-9A-Fa-f]{1,4}"
_IPV4 = (
    r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}"
)
_LS32 = f"({_H16}:{_H16}|{_IPV4})"
_IPV6 = "|".join(  # RFC 3986's IPv6address, one alternative per position of "::"
    [f"({_H16}:){{6}}{_LS32}", f"::({_H16}:){{5}}{_LS32}", f"({_H16})?::({_H16}:){{4}}{_LS32}"]
    + [f"(({_H16}:){{0,{n}}}{_H16})?::({_H16}:){{{3 - n}}}{_LS32}" for n in (1, 2)]
    + [f"(({_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}", f"(({_H16}:){{0,4}}{_H16})?::{_LS32}"]
    + [f"(({_H16}:){{0,5}}{_H16})?::{_H16}", f"(({_H16}:){{0,6}}{_H16})?::"]
)
_HOST = rf"([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?|\[({_IPV6})\])"
_PCHAR = "[A-Za-z0-9._~:@!$&'()*+,;=-]|%[0-9A-Fa-f]{2}"  # RFC 3986
_REST = rf"(/({_PCHAR})*)*(\?([/?]|{_PCHAR})*)?(#([/?]|{_PCHAR})*)?"  # path, query, fragment
# What a callback URL may look like (the OpenAPI schema's pattern too): http(s), a DNS name or
# an IP literal, an optional port, no credentials. Where the host points is checked separately.
CALLBACK_URL_PATTERN = f"^[Hh][Tt][Tt][Pp][Ss]?://{_HOST}(:{_PORT})?{_REST}$"


class CallbackUnresolvable(InvalidRequest):
    """The callback host does not resolve (maybe only for now: a worker retries)."""


class CallbackNotAllowed(InvalidRequest):
    """The callback host resolves to a non-public address (BGQ_WEBHOOK_ALLOW_PRIVATE=false)."""


EVENT_HEADER = "X-Bgq-Event"  # job.done or job.failed


def sign(secret: str, body: bytes) -> str:
    """The signature header value: `sha256=` + hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str | None) -> bool:
    """True when `signature` (the header's value) signs `body` under `secret`."""
    return signature is not None and hmac.compare_digest(sign(secret, body), signature)


def check_callback_syntax(url: str) -> None:
    """Raise InvalidRequest unless `url` matches CALLBACK_URL_PATTERN (what the schema says)."""
    if not re.fullmatch(CALLBACK_URL_PATTERN, url):
        raise InvalidRequest(
            "callback_url must be an http:// or https:// URL with a host, without credentials"
        )


def check_callback_url(url: str, allow_private: bool = False) -> str:
    """Return `url` if bgq may POST to it, else raise InvalidRequest saying why.

    Only http(s) URLs; unless allow_private, every address the host resolves to must be a
    public one (no loopback, private, link-local, multicast or reserved range), so that a
    caller cannot make the workers reach into their own network.
    """
    check_callback_syntax(url)
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"callback_url is not a valid URL: {exc}") from None
    if not parts.hostname:
        raise InvalidRequest("callback_url must be an http:// or https:// URL with a host")
    if allow_private:
        return url
    try:
        refused = first_non_public(lookup(parts.hostname, port))
    except (OSError, UnicodeError) as exc:
        raise CallbackUnresolvable(
            f"callback_url host {parts.hostname!r} does not resolve: {exc}"
        ) from None
    if refused is not None:
        raise CallbackNotAllowed(
            f"callback_url host {parts.hostname!r} is a non-public address ({refused}); "
            "set BGQ_WEBHOOK_ALLOW_PRIVATE=true to allow it"
        )
    return url
