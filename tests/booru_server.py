"""A small Danbooru-shaped HTTP server on 127.0.0.1 for the booru tests (loopback only).

It answers ``/posts.json?tags=...&limit=...&page=...`` with posts in Danbooru's JSON shape and
serves their image files under ``/data/``. Every request is recorded, so tests can count what a
run fetched; ``fail_with`` makes the API answer an HTTP error instead.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image


@dataclass
class Post:
    id: int
    general: list[str]
    character: list[str] = field(default_factory=list)
    copyright: list[str] = field(default_factory=list)
    artist: list[str] = field(default_factory=list)
    meta: list[str] = field(default_factory=list)
    rating: str = "g"
    ext: str = "png"
    color: tuple = (200, 30, 30)
    body: bytes = b""

    def __post_init__(self):
        if not self.body:
            buf = io.BytesIO()
            Image.new("RGB", (64 + self.id, 48), self.color).save(buf, format="PNG" if self.ext == "png" else "JPEG")
            self.body = buf.getvalue()

    @property
    def md5(self) -> str:
        return hashlib.md5(self.body).hexdigest()

    @property
    def all_tags(self) -> list[str]:
        return self.general + self.character + self.copyright + self.artist + self.meta

    def to_json(self, root: str, file_root: str | None = None) -> dict:
        """A post as Danbooru's /posts.json returns it (the fields gallery-dl and lorakit read)."""
        join = " ".join
        return {
            "id": self.id, "created_at": "2024-05-01T12:00:00.000-04:00", "uploader_id": 1, "score": 10 + self.id,
            "source": f"https://example.org/art/{self.id}", "md5": self.md5, "rating": self.rating,
            "image_width": 64 + self.id, "image_height": 48, "tag_string": join(sorted(self.all_tags)),
            "fav_count": 3, "file_ext": self.ext, "parent_id": None, "has_children": False,
            "tag_count_general": len(self.general), "tag_count_artist": len(self.artist),
            "tag_count_character": len(self.character), "tag_count_copyright": len(self.copyright),
            "tag_count_meta": len(self.meta), "file_size": len(self.body), "up_score": 10, "down_score": 0,
            "is_pending": False, "is_flagged": False, "is_deleted": False, "is_banned": False,
            "tag_count": len(self.all_tags), "updated_at": "2024-05-02T12:00:00.000-04:00", "pixiv_id": None,
            "has_large": False, "has_active_children": False, "has_visible_children": False, "bit_flags": 0,
            "tag_string_general": join(self.general), "tag_string_character": join(self.character),
            "tag_string_copyright": join(self.copyright), "tag_string_artist": join(self.artist),
            "tag_string_meta": join(self.meta),
            "file_url": f"{file_root or root}/data/{self.md5}.{self.ext}",
            "large_file_url": f"{root}/data/{self.md5}.{self.ext}",
            "preview_file_url": f"{root}/data/preview/{self.md5}.jpg",
        }


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) that records every request path.

    Subclasses set ``self.posts`` and provide ``_handler()``; ``with Server(...) as s:`` serves."""

    def __init__(self, posts: list[Post]):
        self.posts = list(posts)
        self.requests: list[tuple[float, str]] = []
        self.stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.root = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def paths(self, prefix: str = "") -> list[str]:
        return [p for _, p in self.requests if p.startswith(prefix)]

    def by_id(self, post_id: str) -> Post | None:
        return next((p for p in self.posts if str(p.id) == str(post_id)), None)


class MockDanbooru(LoopbackServer):
    """``with MockDanbooru(posts) as server:`` -> ``server.root``, ``server.requests``."""

    def __init__(self, posts: list[Post]):
        self.auth: list[str | None] = []  # the Authorization header of each request
        self.fail_with: int | None = None
        self.corrupt: set[str] = set()  # md5s whose file is served damaged
        self.huge: set[str] = set()  # md5s whose file claims a 2 GB Content-Length
        self.drip: set[str] = set()  # md5s whose file trickles in one byte at a time, forever
        self.api_drip = False  # the API answers with a body that never ends
        self.file_root: str | None = None  # another root for file URLs (a different host name)
        super().__init__(posts)

    def search(self, tags: str) -> list[Post]:
        wanted = tags.split()
        found = []
        for post in sorted(self.posts, key=lambda p: -p.id):  # newest first, like Danbooru
            ok = all((t[1:] not in post.all_tags) if t.startswith("-") else
                     (f"rating:{post.rating}" == t if t.startswith("rating:") else t in post.all_tags)
                     for t in wanted)
            if ok:
                found.append(post)
        return found

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _send_headers_only(self, ctype: str, length: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    self.wfile.write(b"\x00" * 65536)  # the start of a body that would be 2 GB
                except OSError:
                    pass

            def _trickle(self, ctype: str, length: int | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    while not server.stopping.wait(0.2):
                        self.wfile.write(b"[" if ctype == "application/json" else b"\x00")
                        self.wfile.flush()
                except OSError:
                    pass  # the client gave up

            def do_GET(self):
                server.requests.append((time.monotonic(), self.path))
                server.auth.append(self.headers.get("Authorization"))
                url = urlsplit(self.path)
                if url.path == "/posts.json":
                    if server.fail_with:
                        msg = {"success": False, "message": "mock failure"}
                        return self._send(server.fail_with, json.dumps(msg).encode())
                    if server.api_drip:
                        return self._trickle("application/json")
                    query = parse_qs(url.query)
                    posts = server.search(query.get("tags", [""])[0])
                    limit = int(query.get("limit", ["20"])[0])
                    page = query.get("page", [None])[0]
                    if page and page.startswith("b"):
                        posts = [p for p in posts if p.id < int(page[1:])]
                    elif page and page.isdigit():
                        posts = posts[(int(page) - 1) * limit:]
                    body = json.dumps([p.to_json(server.root, server.file_root) for p in posts[:limit]]).encode()
                    return self._send(200, body)
                if url.path.startswith("/data/"):
                    name = url.path.rsplit("/", 1)[-1]
                    for post in server.posts:
                        if name == f"{post.md5}.{post.ext}":
                            ctype = "image/png" if post.ext == "png" else "image/jpeg"
                            if post.md5 in server.huge:
                                self._send_headers_only(ctype, 2 * 1024 ** 3)
                                return None
                            if post.md5 in server.drip:
                                return self._trickle(ctype)
                            body = post.body + b"damaged" if post.md5 in server.corrupt else post.body
                            return self._send(200, body, ctype)
                return self._send(404, b'{"success": false, "message": "not found"}')

        return Handler
