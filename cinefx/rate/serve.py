"""`cinefx rate --serve`: a study's page on this machine only, saving each rater's answers as given.

Binds to 127.0.0.1. Serves the page and its media and nothing else (never key.json, answers or
tallies); takes a rater's answers so far as one POST after every answer and writes them to
answers/RATER.json whole (see `cinefx.fsutil`), so a crash or Ctrl-C loses at most the answer being
sent. Requests naming another host are refused, so a web page cannot reach the study through a
DNS name rebound to 127.0.0.1; answers must come as application/json, which a page of another
origin cannot send here without a CORS preflight this server never grants.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from cinefx.errors import InputFileError, OptionError
from cinefx.fsutil import write_text
from cinefx.rate.study import load_key
from cinefx.rate.tally import MAX_ANSWERS_FILE, check_answers

DEFAULT_PORT = 8765
_MEDIA = re.compile(r"/media/[0-9a-f]{16}\.(webm|jpg)")
_TYPES = {".html": "text/html; charset=utf-8", ".webm": "video/webm", ".jpg": "image/jpeg"}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class StudyServer(ThreadingHTTPServer):
    """The study in `folder` at `url`. Run with `serve_forever()`; stop with `shutdown()` (from
    another thread) and `server_close()`."""

    daemon_threads = True

    def __init__(self, folder: str | os.PathLike, port: int = DEFAULT_PORT):
        self.folder = Path(folder)
        self.key = load_key(self.folder)
        if not (self.folder / "index.html").is_file():
            raise InputFileError(f"{self.folder}: has no index.html; give the folder `cinefx rate -o` made")
        self._lock = threading.Lock()
        self._saved: dict[str, int] = {}  # rater → seq of the answers on disk
        try:
            super().__init__(("127.0.0.1", port), _Handler)
        except OSError as ex:
            raise OptionError(f"--port {port}: cannot listen on 127.0.0.1 ({ex.strerror}); "
                              "choose another port, or 0 for any free one") from ex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def save(self, data: dict) -> int | None:
        """Write a rater's answers (checked) unless newer ones are already saved; returns how many
        answers were written, None when newer ones were there. Posts can overtake each other on their threads: `seq`
        counts the rater's answers, so a late older post never replaces a newer one."""
        rater, seq = data["rater"], data["seq"]
        path = self.folder / "answers" / f"{rater}.json"
        with self._lock:
            if rater not in self._saved and path.is_file():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self._saved[rater] = int(json.loads(path.read_text(encoding="utf-8"))["seq"])
            if seq > self._saved.get(rater, -1):
                path.parent.mkdir(exist_ok=True)
                write_text(path, json.dumps(data, indent=1))
                self._saved[rater] = seq
                return sum(len(a) for a in data["answers"].values())
            return None

    def handle_error(self, request, client_address):
        pass  # browsers drop media connections mid-transfer all the time; nothing to report


class _Handler(BaseHTTPRequestHandler):
    server: StudyServer

    def log_message(self, format, *args):
        pass  # raters' requests are not news to the person running the study

    def _refuse(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        return self.headers.get("Host", "") in (f"127.0.0.1:{port}", f"localhost:{port}")

    def do_GET(self):
        if not self._host_ok():
            return self._refuse(403, "this study is served to 127.0.0.1 only")
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._file(self.server.folder / "index.html")
        if _MEDIA.fullmatch(path):
            return self._file(self.server.folder / path[1:])
        self._refuse(404, "not part of the study page")

    def do_POST(self):
        if not self._host_ok():
            return self._refuse(403, "this study is served to 127.0.0.1 only")
        if urlsplit(self.path).path != "/answers":
            return self._refuse(404, "answers go to /answers")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._refuse(415, "answers must be sent as application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._refuse(411, "Content-Length needed")
        if not 0 < length <= MAX_ANSWERS_FILE:
            return self._refuse(413, f"{length} bytes is not a rater's answers")
        try:
            data = check_answers(self.server.key, json.loads(self.rfile.read(length)), "POST /answers")
        except (ValueError, InputFileError) as ex:  # bad JSON is a ValueError too
            return self._refuse(400, str(ex)[:300])
        saved = self.server.save(data)
        body = json.dumps({"saved": saved, "seq": data["seq"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, path: Path) -> None:
        """`path`, whole or the byte range asked for: players seek (and loop) through ranges."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return self._refuse(404, "no such media")
        start, end = 0, size - 1
        m = _RANGE.fullmatch(self.headers.get("Range", ""))
        if m and (m[1] or m[2]):
            start, end = (int(m[1]), min(int(m[2] or end), end)) if m[1] else (max(0, size - int(m[2])), end)
            if start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(206 if m and (m[1] or m[2]) else 200)
        self.send_header("Content-Type", _TYPES[path.suffix])
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if m and (m[1] or m[2]):
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(left, 1 << 16))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
