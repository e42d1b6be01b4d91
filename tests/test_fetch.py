"""Fetching images by URL from a real HTTP server on loopback: address rule, limits, timeouts."""

from __future__ import annotations

import contextlib
import ipaddress
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bgq import fetch
from bgq.fetch import FetchFailed, fetch_image, guarded_client

PHOTO = (Path(__file__).resolve().parent.parent / "samples" / "car-1.jpg").read_bytes()
PNG_WITH_JPG_NAME = Path(__file__).resolve().parent.parent / "samples" / "plants-1.jpg"
MB = 1 << 20
STALL_SENDING = 2.5  # seconds /stall sends a byte every 0.05 s before it goes silent


class Server(ThreadingHTTPServer):
    """A test server that counts the connections it accepted and the paths it was asked for."""

    daemon_threads = True

    def __init__(self, host: str, port: int = 0) -> None:
        super().__init__((host, port), Handler)
        self.connections = 0
        self.paths: list[str] = []
        self.stop = threading.Event()  # ends the handlers that sleep or drip
        self.base = f"http://{host}:{self.server_address[1]}"

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1
        return True


class Handler(BaseHTTPRequestHandler):
    """Routes: /photo, /redirect/N, /to/URL, /status/N, /html, /big/{close,chunked,length},
    /drip, /stall."""

    server: Server

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        route, _, arg = self.path.lstrip("/").partition("/")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
            getattr(self, "route_" + route)(arg)

    def reply(self, status: int, body: bytes, content_type: str = "image/jpeg") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_photo(self, arg: str) -> None:
        self.reply(200, PNG_WITH_JPG_NAME.read_bytes() if arg == "png" else PHOTO)

    def route_redirect(self, arg: str) -> None:
        left = int(arg)
        self.send_response(302)
        self.send_header("Location", f"/redirect/{left - 1}" if left > 1 else "/photo")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_to(self, arg: str) -> None:
        self.send_response(302)
        self.send_header("Location", arg)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_status(self, arg: str) -> None:
        self.reply(int(arg), b"no such image", "text/plain")

    def route_html(self, arg: str) -> None:
        self.reply(200, b"<!DOCTYPE html><html><body>not an image</body></html>", "text/html")

    def route_big(self, arg: str) -> None:
        if arg == "chunked":
            self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if arg == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        if arg == "length":
            self.send_header("Content-Length", str(1 << 30))
        self.end_headers()
        if arg == "length":  # announced, never sent: only the header can fail it
            self.server.stop.wait(30)
            return
        piece = PHOTO[:16384]
        for _ in range(4 * MB // len(piece)):
            if arg == "chunked":
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
        if arg == "chunked":
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def route_drip(self, arg: str) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PHOTO)))
        self.end_headers()
        for i in range(200):  # 10 s, then the connection closes early
            self.wfile.write(PHOTO[i : i + 1])
            self.wfile.flush()
            if self.server.stop.wait(0.05):
                return

    def route_cookie(self, arg: str) -> None:
        """Sets a cookie, and serves the photo only to a request that carries none."""
        if "Cookie" in self.headers:
            self.reply(400, b"a cookie came back", "text/plain")
            return
        self.send_response(200)
        self.send_header("Set-Cookie", "session=abc; Path=/")
        self.send_header("Content-Length", str(len(PHOTO)))
        self.end_headers()
        self.wfile.write(PHOTO)

    def route_stall(self, arg: str) -> None:  # a byte every 0.05 s for STALL_SENDING, then none
        self.send_response(200)
        self.send_header("Content-Length", str(len(PHOTO)))
        self.end_headers()
        for i in range(round(STALL_SENDING / 0.05)):
            self.wfile.write(PHOTO[i : i + 1])
            self.wfile.flush()
            time.sleep(0.05)
        self.server.stop.wait(10)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Starts servers on loopback addresses; stops them at teardown."""
    started: list[tuple[Server, threading.Thread]] = []

    def start(host: str = "127.0.0.1", port: int = 0) -> Server:
        server = Server(host, port)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def server(serve: Callable[..., Server]) -> Server:
    return serve()


@pytest.fixture
def only_127_0_0_1_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """The address rule, changed so that 127.0.0.1 counts as public and 127.0.0.2 does not."""
    monkeypatch.setattr(fetch, "is_public", lambda a: a == ipaddress.ip_address("127.0.0.1"))


def get(
    url: str,
    allow_private: bool = True,
    timeout: float = 5,
    max_bytes: int = 8 * MB,
    client: Any = None,
) -> bytes:
    return fetch_image(
        url, allow_private=allow_private, timeout=timeout, max_bytes=max_bytes, client=client
    )


def refused(url: str, reason: str, **kwargs: Any) -> FetchFailed:
    with pytest.raises(FetchFailed) as failed:
        get(url, **kwargs)
    assert failed.value.reason == reason, str(failed.value)
    assert "\n" not in str(failed.value)
    return failed.value


def test_a_photo_is_fetched_byte_identical(server: Server) -> None:
    assert get(server.base + "/photo") == PHOTO
    png = get(server.base + "/photo/png")  # a PNG named .jpg: the content decides
    assert png == PNG_WITH_JPG_NAME.read_bytes() and png.startswith(b"\x89PNG")


def test_a_shared_client_is_reused_across_threads(server: Server) -> None:
    with guarded_client(allow_private=True, timeout=5) as client:
        results: list[bytes] = []

        def one() -> None:
            data = fetch_image(
                server.base + "/photo", allow_private=True, timeout=5, max_bytes=MB, client=client
            )
            results.append(data)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [PHOTO] * 4
        with pytest.raises(ValueError, match="guarded_client"):  # its rule must be the one asked
            fetch_image(server.base, allow_private=False, timeout=5, max_bytes=MB, client=client)


def test_three_redirects_are_followed_a_fourth_is_refused(server: Server) -> None:
    assert get(server.base + "/redirect/3") == PHOTO
    failure = refused(server.base + "/redirect/4", "redirects")
    assert "127.0.0.1" in str(failure) and "3 redirects" in str(failure)
    assert "/photo" not in server.paths[-4:]


@pytest.mark.usefixtures("only_127_0_0_1_public")
def test_a_redirect_to_a_private_address_is_refused(serve: Callable[..., Server]) -> None:
    public, private = serve("127.0.0.1"), serve("127.0.0.2")
    assert get(public.base + "/photo", allow_private=False) == PHOTO  # the rule lets it through
    failure = refused(f"{public.base}/to/{private.base}/photo", "not_allowed", allow_private=False)
    assert "127.0.0.2" in str(failure)
    assert private.connections == 0 and private.paths == []  # Linux would have connected to it
    assert get(f"{public.base}/to/{private.base}/photo") == PHOTO  # allowed with the flag


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "[::ffff:127.0.0.1]", "0x7f000001", "2130706433", "[::1]", "localhost"],
)
def test_loopback_in_any_form_is_refused(server: Server, host: str) -> None:
    port = server.server_address[1]
    refused(f"http://{host}:{port}/photo", "not_allowed", allow_private=False)
    assert server.connections == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.1/x.jpg",
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://[2002:a9fe:a9fe::]/",  # 6to4 of 169.254.169.254
        "http://[64:ff9b:1::a00:1]/",  # local-use NAT64 (RFC 8215) of 10.0.0.1
        "http://[fec0::1]/",  # site-local
        "http://224.0.0.1/",
        "http://240.0.0.1/",
    ],
)
def test_non_public_addresses_are_refused_before_connecting(url: str) -> None:
    failure = refused(url, "not_allowed", allow_private=False, timeout=1)
    assert "not a public address" in str(failure)


@pytest.mark.usefixtures("only_127_0_0_1_public")
def test_dns_rebinding_connects_only_to_the_checked_address(
    serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name answers a public address first, then a private one: the second is never used."""
    checked = serve("127.0.0.1")
    port = checked.server_address[1]
    attacker = serve("127.0.0.2", port)  # same port: a second resolution would land here
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"])
    lookups: list[str] = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "images.example":
            return real(host, *args, **kwargs)
        lookups.append(address := next(answers, "127.0.0.2"))
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert get(f"http://images.example:{port}/photo", allow_private=False) == PHOTO
    assert lookups == ["127.0.0.1"] and checked.paths == ["/photo"]
    assert attacker.connections == 0
    # Asked again, the name now answers the private address: refused, still not connected.
    refused(f"http://images.example:{port}/photo", "not_allowed", allow_private=False)
    assert attacker.connections == 0


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_a_body_over_the_limit_without_a_length_is_cut_off(server: Server, framing: str) -> None:
    failure = refused(f"{server.base}/big/{framing}", "too_large", max_bytes=MB)
    assert str(MB) in str(failure)


def test_a_content_length_over_the_limit_fails_before_reading(server: Server) -> None:
    # No byte of that body is ever sent: waiting for one would end in "timeout".
    failure = refused(server.base + "/big/length", "too_large", max_bytes=MB, timeout=10)
    assert f"{1 << 30} bytes" in str(failure)  # the announced length, from the header


@pytest.mark.parametrize(("route", "timeout"), [("drip", 1), ("redirect/2", 1), ("stall", 3)])
def test_the_timeout_covers_the_whole_fetch(
    server: Server, route: str, timeout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drip: no read waits long, but the body would take 10 s (then the server closes it:
    "network"); redirect/2: each hop is quick, the three are not (timeouts per hop would let
    it succeed); stall: the read that hangs once the bytes stop is cut at the fetch's deadline,
    not a timeout after it began (STALL_SENDING + timeout)."""
    if route.startswith("redirect"):  # every hop is quick, but the three together are not
        real = fetch.GuardedBackend.connect_tcp

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.4)
            return real(*args, **kwargs)

        monkeypatch.setattr(fetch.GuardedBackend, "connect_tcp", slow)
    start = time.monotonic()
    failure = refused(f"{server.base}/{route}", "timeout", timeout=timeout)
    # Not before the deadline; past it by less than half of what a timeout per read would add
    # to the stall: slack for a loaded machine, not a figure (bench/ measures how fast).
    assert timeout - 0.1 < time.monotonic() - start < timeout + STALL_SENDING / 2, str(failure)


def test_an_error_status_is_refused(server: Server) -> None:
    failure = refused(server.base + "/status/404", "http_status")
    assert "404" in str(failure) and "127.0.0.1" in str(failure)
    copy = pickle.loads(pickle.dumps(failure))  # as a Celery task's failure travels
    assert (copy.reason, str(copy)) == (failure.reason, str(failure))


def test_an_html_page_is_not_an_image(server: Server) -> None:
    refused(server.base + "/html", "not_an_image")


def test_an_unresolvable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def nxdomain(host: Any, *args: Any, **kwargs: Any) -> Any:
        """What a resolver answers for a name that does not exist (asking the system's own
        would leave loopback, and where it times out the reason is rightly "timeout")."""
        if str(host).endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", nxdomain)
    failure = refused("http://nonexistent.invalid/x.jpg", "dns", allow_private=False)
    assert "nonexistent.invalid" in str(failure)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x.jpg",
        "file:///etc/passwd",
        "http://user:s3cret@127.0.0.1/x.jpg",
        "http:///x.jpg",
        "not a url",
        "http://127.0.0.1:99999/x.jpg",
    ],
)
def test_bad_urls(url: str) -> None:
    failure = refused(url, "bad_url")
    assert "s3cret" not in str(failure) and "user" not in str(failure)


def test_a_redirect_may_not_leave_http(server: Server) -> None:
    refused(server.base + "/to/file:///etc/passwd", "bad_url")
    refused(server.base + "/to/http://user:s3cret@127.0.0.1/", "bad_url")


def test_guarded_client_refuses_options_that_bypass_it() -> None:
    with pytest.raises(TypeError, match="proxy"):
        guarded_client(False, 5, proxy="http://127.0.0.1:3128")


def test_a_slow_dns_lookup_counts_against_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = threading.Event()
    answered: list[str] = []

    def stuck(host: Any, *args: Any, **kwargs: Any) -> Any:
        """A lookup that hangs until the test lets it answer (30 s at most)."""
        answer.wait(timeout=30)
        answered.append(str(host))
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    try:
        failure = refused("http://photos.example/x.jpg", "timeout", timeout=0.5)
        assert "DNS" in str(failure) and answered == []  # given up while the lookup hangs
    finally:
        answer.set()


def test_cookies_never_ride_along(server: Server) -> None:
    with guarded_client(True, 5) as client:
        for _ in range(2):  # the second request would carry the first one's cookie
            assert get(f"{server.base}/cookie", client=client) == PHOTO
