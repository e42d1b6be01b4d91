"""Webhook signatures and the callback URL rules (no network: literal addresses only)."""

from __future__ import annotations

import ipaddress

import pytest

from bgq.errors import InvalidRequest
from bgq.fetch import is_public
from bgq.webhooks import check_callback_url, sign, verify


def test_signature_round_trip() -> None:
    body = b'{"id":"k","status":"done"}'
    header = sign("s3cret", body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify("s3cret", body, header)
    assert not verify("s3cret", body + b" ", header)
    assert not verify("other", body, header)
    assert not verify("s3cret", body, None)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fd00::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("::127.0.0.1", False),  # IPv4-compatible
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    "url",
    [
        "ftp://8.8.8.8/x",
        "http:///nohost",
        "https://user:pw@8.8.8.8/x",
        "http://127.0.0.1/x",
        "http://[::ffff:10.0.0.1]/x",
        "http://8.8.8.8:99999/x",
        "http://8.8.8.8:/x",
        "http://[1:2]/x",
        "http://8.8.8.8/a b",
        "http://8.8.8.8/%zz",
    ],
)
def test_refused_callbacks(url: str) -> None:
    with pytest.raises(InvalidRequest):
        check_callback_url(url)


def test_allowed_callbacks() -> None:
    assert check_callback_url("https://8.8.8.8/hook") == "https://8.8.8.8/hook"
    assert check_callback_url("HTTP://[2001:4860:4860::8888]:8080/h?a=%20#f")
    assert check_callback_url("http://127.0.0.1:9/x", allow_private=True)
