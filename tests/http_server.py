"""A real HTTP server on 127.0.0.1 for the download tests (OC20 archives, published
checkpoints): serves bytes from memory, can cut a transfer or ignore Range requests, and
records what it was asked."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class ServedFiles:
    """What the test server serves, how it misbehaves, and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before a cut
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)

    def ranges(self, path: str) -> list[str | None]:
        return [range_header for requested, range_header in self.requests if requested == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # the method name http.server dispatches GET requests to
        state: ServedFiles = self.server.state
        range_header = self.headers.get("Range")
        state.requests.append((self.path, range_header))
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return

        start = 0
        if range_header and not state.ignore_range:
            start = int(range_header.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()

        cut = state.cut_after.pop(self.path, None)  # only the first request is cut
        if cut is not None:
            # Promise the full length, send part of it, then hang up.
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, format, *args):  # keep the test output quiet
        pass


@contextlib.contextmanager
def serve() -> Iterator[tuple[str, ServedFiles]]:
    """A ThreadingHTTPServer on 127.0.0.1 (free port); yields (base_url, ServedFiles)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = ServedFiles()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
