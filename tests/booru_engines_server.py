"""Gelbooru 0.2 and Moebooru shaped HTTP servers on 127.0.0.1 (loopback only), for gallery-dl.

* Gelbooru 0.2 (safebooru.org, tbib...): ``/index.php?page=dapi&s=post&q=index&tags=&limit=&pid=``
  answers XML ``<posts count=".."><post id=".." md5=".." file_url=".." tags=" a b " .../></posts>``;
  the post page ``/index.php?page=post&s=view&id=N`` lists tags by type in ``<ul id="tag-sidebar">``
  (what gallery-dl reads with its ``tags`` option).
* Moebooru (yande.re, konachan): ``/post.json?tags=&limit=&page=`` answers a JSON list; the post
  page ``/post/show/N`` lists tags by type the same way.

Files are served under ``/data/``. Every request is recorded.
"""
from __future__ import annotations

import json
import time
from html import escape
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, quote, urlsplit

from booru_server import LoopbackServer, Post

ENGINES = ("gelbooru_v02", "moebooru")


class MockBooruEngine(LoopbackServer):
    """``with MockBooruEngine("moebooru", posts) as server:`` -> ``server.root``, ``server.requests``."""

    def __init__(self, engine: str, posts: list[Post]):
        assert engine in ENGINES
        self.engine = engine
        super().__init__(posts)

    def search(self, tags: str) -> list[Post]:
        wanted = tags.split()
        return [p for p in sorted(self.posts, key=lambda p: -p.id)
                if all((t[1:] not in p.all_tags) if t.startswith("-") else t in p.all_tags for t in wanted)]

    # ----- answers in each engine's shape -------------------------------------------------------
    def gelbooru_xml(self, posts: list[Post], count: int, offset: int) -> bytes:
        rows = []
        for p in posts:
            attrs = {
                "height": "48", "score": str(10 + p.id), "file_url": f"{self.root}/data/{p.md5}.{p.ext}",
                "parent_id": "", "sample_url": f"{self.root}/data/{p.md5}.{p.ext}", "sample_width": str(64 + p.id),
                "sample_height": "48", "preview_url": f"{self.root}/data/preview/{p.md5}.jpg",
                "rating": {"g": "s", "s": "q"}.get(p.rating, p.rating), "tags": " " + " ".join(sorted(p.all_tags)) + " ",
                "id": str(p.id), "width": str(64 + p.id), "change": "1714500000", "md5": p.md5, "creator_id": "1",
                "has_children": "false", "created_at": "Wed May 01 12:00:00 +0000 2024", "status": "active",
                "source": f"https://example.org/art/{p.id}", "has_notes": "false", "has_comments": "false",
                "preview_width": "150", "preview_height": "113",
            }
            rows.append("<post " + " ".join(f'{k}="{escape(v)}"' for k, v in attrs.items()) + "/>")
        return (f'<?xml version="1.0" encoding="UTF-8"?><posts count="{count}" offset="{offset}">'
                + "".join(rows) + "</posts>").encode()

    def moebooru_json(self, posts: list[Post]) -> bytes:
        return json.dumps([{
            "id": p.id, "tags": " ".join(sorted(p.all_tags)), "created_at": 1714564800, "creator_id": 1,
            "author": "uploader", "change": 1, "source": f"https://example.org/art/{p.id}", "score": 10 + p.id,
            "md5": p.md5, "file_size": len(p.body), "file_ext": p.ext,
            "file_url": f"{self.root}/data/{p.md5}.{p.ext}", "is_shown_in_index": True,
            "preview_url": f"{self.root}/data/preview/{p.md5}.jpg", "rating": {"g": "s", "s": "q"}.get(p.rating, p.rating),
            "width": 64 + p.id, "height": 48, "status": "active", "has_children": False, "parent_id": None,
        } for p in posts]).encode()

    def post_page(self, p: Post) -> bytes:
        """The post's HTML page: the tag sidebar gallery-dl parses for tag types."""
        items = []
        for kind, tags in (("artist", p.artist), ("copyright", p.copyright), ("character", p.character),
                           ("general", p.general), ("metadata", p.meta)):
            for t in tags:
                href = (f"index.php?page=post&amp;s=list&amp;tags={quote(t)}" if self.engine == "gelbooru_v02"
                        else f"/post?tags={quote(t)}")
                items.append(f'<li class="tag-type-{kind} tag"><a href="{href}">{escape(t.replace("_", " "))}</a> '
                             f'<span class="tag-count">12</span></li>')
        return (f'<html><body><div id="content"><ul id="tag-sidebar">{"".join(items)}</ul>'
                f'<img id="image" src="{self.root}/data/{p.md5}.{p.ext}"/></div></body></html>').encode()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                server.requests.append((time.monotonic(), self.path))
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path.startswith("/data/"):
                    name = url.path.rsplit("/", 1)[-1]
                    post = next((p for p in server.posts if name == f"{p.md5}.{p.ext}"), None)
                    if post:
                        return self._send(200, post.body, "image/png" if post.ext == "png" else "image/jpeg")
                elif server.engine == "gelbooru_v02" and url.path == "/index.php":
                    if query.get("page") == "dapi" and query.get("q") == "index":
                        posts = server.search(query.get("tags", ""))
                        limit, pid = int(query.get("limit", 100)), int(query.get("pid", 0))
                        body = server.gelbooru_xml(posts[pid * limit:(pid + 1) * limit], len(posts), pid * limit)
                        return self._send(200, body, "text/xml")
                    if query.get("page") == "post" and query.get("s") == "view" and server.by_id(query.get("id")):
                        return self._send(200, server.post_page(server.by_id(query["id"])), "text/html")
                elif server.engine == "moebooru":
                    if url.path == "/post.json":
                        posts = server.search(query.get("tags", ""))
                        limit, page = int(query.get("limit", 100)), int(query.get("page", 1))
                        return self._send(200, server.moebooru_json(posts[(page - 1) * limit:page * limit]),
                                          "application/json")
                    if url.path.startswith("/post/show/") and server.by_id(url.path.rsplit("/", 1)[-1]):
                        return self._send(200, server.post_page(server.by_id(url.path.rsplit("/", 1)[-1])),
                                          "text/html")
                return self._send(404, b"not found", "text/plain")

        return Handler
