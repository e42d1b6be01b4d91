"""A real HTTP server on loopback serving a folder of photos, for URL-input tests and benchmarks.

Optional added latency per request (a CDN's round trip), and a count of requests in flight at
once, so a test can see that ingest fetches several URLs together.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class PhotoServer:
    """Serves `root`'s files at `/<name>` on 127.0.0.1 (a free port); stop() ends it."""

    def __init__(self, root: Path, delay: float = 0.0) -> None:
        self.root, self.delay = root, delay
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def __enter__(self) -> PhotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def started(self) -> None:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def ended(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def hold(self) -> None:
        """What each request waits before its answer: the added latency."""
        time.sleep(self.delay)


def _handler(owner: PhotoServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            owner.started()
            try:
                owner.hold()
                path = owner.root / self.path.lstrip("/").split("?")[0]
                if ".." in self.path or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            finally:
                owner.ended()

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
