"""A loopback HTTP file server for download tests: Range requests (206), HEAD with sizes, 404s,
a connection dropped after N bytes (once), Google-Drive-like error pages, and a log of every
request with the bytes it was sent."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    method: str
    path: str
    range_start: int
    bytes_sent: int


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict)    # URL path -> content
    drop_after: dict[str, int] = field(default_factory=dict)  # URL path -> bytes, then drop (once)
    pages: dict[str, tuple[int, str]] = field(default_factory=dict)  # URL path -> (status, html)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # URL path -> extra headers
    ranges: bool = True  # False: ignore Range headers and always send the whole file with 200
    log: list[Served] = field(default_factory=list)

    def __enter__(self) -> FileServer:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def sent(self, path: str) -> int:
        return sum(s.bytes_sent for s in self.log if s.path == path)


def _handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = self.path
            if path in server.pages:
                status, html = server.pages[path]
                self._reply(status, html.encode(), "text/html; charset=utf-8", body)
                return
            data = server.files.get(path.split("?")[0])
            if data is None:
                self._reply(404, b"not found", "text/plain", body)
                return
            ranged = bool(self.headers.get("Range")) and server.ranges
            start, end = _parse_range(self.headers.get("Range") if ranged else None, len(data))
            chunk = data[start:end]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Type", "application/octet-stream")
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Content-Disposition", f'attachment; filename="{path.rsplit("/", 1)[-1].split("?")[0]}"')
            for name, value in server.headers.get(path.split("?")[0], {}).items():
                self.send_header(name, value)
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            limit = server.drop_after.get(path.split("?")[0])
            if limit is not None and start < limit < end:
                del server.drop_after[path.split("?")[0]]  # drop once
                self.wfile.write(chunk[:limit - start])
                self.wfile.flush()
                server.log.append(Served("GET", path.split("?")[0], start, limit - start))
                self.close_connection = True
                self.connection.shutdown(2)
                return
            try:
                self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                return
            server.log.append(Served("GET", path.split("?")[0], start, len(chunk)))

        def _reply(self, status: int, payload: bytes, ctype: str, body: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler


def _parse_range(header: str | None, size: int) -> tuple[int, int]:
    if not header:
        return 0, size
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", header.strip())
    if not m:
        return 0, size
    start = int(m.group(1))
    end = int(m.group(2)) + 1 if m.group(2) else size
    return start, min(end, size)


def hub_repo(repo: str, files: dict[str, bytes], commit: str = "c0ffee" * 6 + "c0ff") -> tuple[dict, dict]:
    """(files, headers) for FileServer that make it answer like the Hugging Face Hub for one
    dataset repo: the revision and tree APIs and ``resolve`` URLs with the commit and ETag headers
    huggingface_hub requires."""
    import hashlib
    import json
    served, headers = {}, {}
    for name, data in files.items():
        for revision in ("main", commit):
            path = f"/datasets/{repo}/resolve/{revision}/{name}"
            served[path] = data
            headers[path] = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
    served[f"/api/datasets/{repo}/revision/main"] = json.dumps(
        {"id": repo, "sha": commit, "siblings": [{"rfilename": n} for n in files]}).encode()
    served[f"/api/datasets/{repo}/tree/{commit}"] = json.dumps(
        [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for n, d in files.items()]).encode()
    return served, headers
