"""The review page's ASGI application (Starlette): JSON API, media and the page's own assets.

Routes (all behind ``security.Guard``):

    GET  /                       the page
    GET  /assets/NAME            its script and style (package data, a fixed list)
    GET  /api/summary            subsets, tag frequencies, buckets, set-aside reasons, counts
    GET  /api/images?FILTER      one page of the gallery (offset, limit) and the total
    GET  /api/ids?FILTER         every id the filter shows
    GET  /api/image/ID           one image in full: tags with tagger scores, steps, metadata
    GET  /api/dedupe             duplicate groups with distances and the keeper
    GET  /api/history            the curation file's edits, newest first
    GET  /media/KIND/ID          thumb, image, mask or source of one image (files the manifest names)
    POST /api/edit               one batch edit through the curation API
    POST /api/undo               undo the last edit
"""
from __future__ import annotations

import html
import json
import secrets
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from lorakit.plugin_sdk import LorakitError

from . import edits
from .data import Filter, RequestError, ReviewData
from .security import MAX_BODY, TOKEN_COOKIE, Guard
from .thumbs import ThumbnailError, Thumbnails

MEDIA_KINDS = ("thumb", "image", "mask", "source")
PAGE_LIMIT = 500
_ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".svg": "image/svg+xml", ".png": "image/png"}


def _assets() -> dict[str, bytes]:
    """The page's files, read once from the installed package (no Node build step)."""
    folder = resources.files("lorakit.review") / "assets"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


class ReviewState:
    """The dataset as the page sees it, rebuilt after each edit (under a lock: one edit at a time)."""

    def __init__(self, dataset_dir: Path, pipeline_path: Path | None = None):
        self.dataset_dir = Path(dataset_dir).resolve()
        self.pipeline_path = Path(pipeline_path).resolve() if pipeline_path else None
        self.lock = threading.RLock()
        self.generation = 0
        self.data = ReviewData(self.dataset_dir, self.pipeline_path)
        self.thumbs = Thumbnails(self.dataset_dir / ".lorakit" / "review" / "thumbs")
        self.prefetcher: threading.Thread | None = None
        self.stop_prefetch = threading.Event()

    def reload(self) -> None:
        self.data = ReviewData(self.dataset_dir, self.pipeline_path)
        self.generation += 1
        if self.prefetcher is not None:  # an edit may bring new pictures (a restored image)
            self.start_prefetch()

    def start_prefetch(self) -> threading.Thread:
        """Make every missing thumbnail in a background thread, in gallery order (the first page first)."""
        if self.prefetcher is not None and self.prefetcher.is_alive():
            self.stop_prefetch.set()
            self.prefetcher.join()
        self.stop_prefetch = threading.Event()
        data, stop = self.data, self.stop_prefetch

        def items():
            for e in data.entries:
                if e.file is not None:
                    try:
                        yield data.served_path(e.file, inside=True), e.sha256
                    except RequestError:  # a file the page would refuse to serve is not made either
                        continue

        self.prefetcher = threading.Thread(target=self.thumbs.prefetch, args=(items(), stop),
                                           name="lorakit-thumbnails", daemon=True)
        self.prefetcher.start()
        return self.prefetcher


def create_app(dataset_dir: Path, pipeline_path: Path | None = None, *, token: str | None = None,
               hosts: set[str] | None = None, prefetch: bool = False) -> Guard:
    """The review application for one dataset folder, wrapped in its guard. ``hosts`` are the
    accepted Host headers (None: any); ``token`` is the access token (random when not given; the
    returned app's ``token``, ``csrf_token`` and ``review`` state are attributes). ``prefetch``
    makes the missing thumbnails in a background thread from the start."""
    state = ReviewState(dataset_dir, pipeline_path)
    if prefetch:
        state.start_prefetch()
    assets = _assets()
    csrf = secrets.token_urlsafe(24)
    token = token or secrets.token_urlsafe(24)

    def ok(data: Any, status: int = 200, cache: str = "no-store") -> JSONResponse:
        return JSONResponse(data, status_code=status, headers={"cache-control": cache})

    def guarded(handler):
        """Bad input becomes a 4xx with its message; nothing a request sends can crash the server."""
        async def endpoint(request: Request):
            try:
                return await handler(request)
            except RequestError as exc:
                return ok({"error": str(exc)}, exc.status)
            except LorakitError as exc:
                return ok({"error": str(exc)}, 409)
        return endpoint

    async def page(request: Request):
        if "token" in request.query_params:  # first visit: the token becomes a cookie, the URL loses it
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
            return response
        text = assets["index.html"].decode("utf-8").replace("{{csrf}}", html.escape(csrf))
        text = text.replace("{{title}}", html.escape(state.dataset_dir.name))
        return Response(text, media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"})

    async def asset(request: Request):
        name = request.path_params["name"]
        suffix = Path(name).suffix
        if name not in assets or suffix not in _ASSET_TYPES:
            raise RequestError(f"no asset {name!r}", 404)
        return Response(assets[name], media_type=_ASSET_TYPES[suffix], headers={"cache-control": "no-cache"})

    async def summary(request: Request):
        data = state.data
        return ok({**data.summary(), "generation": state.generation})

    def _page_args(request: Request) -> tuple[int, int]:
        try:
            offset = int(request.query_params.get("offset", "0"))
            limit = int(request.query_params.get("limit", "200"))
        except ValueError:
            raise RequestError("offset and limit must be whole numbers") from None
        if offset < 0 or not 1 <= limit <= PAGE_LIMIT:
            raise RequestError(f"offset must be >= 0 and limit between 1 and {PAGE_LIMIT}")
        return offset, limit

    async def images(request: Request):
        offset, limit = _page_args(request)
        f = Filter.from_query(request.query_params.multi_items())
        found = state.data.query(f)
        return ok({"total": len(found), "offset": offset, "generation": state.generation,
                   "items": [e.brief() for e in found[offset:offset + limit]]})

    async def ids(request: Request):
        f = Filter.from_query(request.query_params.multi_items())
        return ok({"ids": [e.id for e in state.data.query(f)], "generation": state.generation})

    async def image(request: Request):
        e = state.data.entry(request.path_params["id"])
        detail = e.detail()
        detail["subset_choices"] = sorted(state.data.manifest.subsets)
        return ok(detail)

    async def dedupe(request: Request):
        return ok({"groups": state.data.dedupe_groups})

    async def history(request: Request):
        return ok({"edits": await run_in_threadpool(edits.history, state)})

    async def media(request: Request):
        kind, entry_id = request.path_params["kind"], request.path_params["id"]
        if kind not in MEDIA_KINDS:
            raise RequestError(f"unknown media kind {kind!r} (one of {', '.join(MEDIA_KINDS)})", 404)
        e = state.data.entry(entry_id)
        path = {"thumb": e.file, "image": e.file, "mask": e.mask or e.rejected_mask, "source": e.source() if kind == "source" else None}[kind]
        if path is None:
            raise RequestError(f"{e.name}: no {kind} file", 404)
        cache = "private, max-age=86400" if request.query_params.get("v") else "no-cache"
        path = state.data.served_path(path, inside=kind != "source")  # a source lies outside the dataset
        if kind == "thumb":
            try:
                body = await run_in_threadpool(state.thumbs.thumbnail, path, e.sha256)
            except ThumbnailError as exc:
                raise RequestError(str(exc), 422) from None
            return Response(body, media_type="image/jpeg", headers={"cache-control": cache})
        return FileResponse(path, headers={"cache-control": cache})

    async def read_json(request: Request) -> dict[str, Any]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise RequestError(f"request body over {MAX_BODY} bytes", 413)
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise RequestError("the body must be a JSON object")
        return data

    async def edit(request: Request):
        data = await read_json(request)
        result = await run_in_threadpool(edits.apply, state, data)
        return ok({**result, "generation": state.generation})

    async def undo(request: Request):
        await read_json(request)
        result = await run_in_threadpool(edits.undo, state)
        return ok({**result, "generation": state.generation})

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        detail = getattr(exc, "detail", "") or ("not found" if status == 404 else "bad request")
        return ok({"error": f"{request.method} {request.url.path}: {detail}"}, status)

    routes = [
        Route("/", guarded(page)),
        Route("/assets/{name}", guarded(asset)),
        Route("/api/summary", guarded(summary)),
        Route("/api/images", guarded(images)),
        Route("/api/ids", guarded(ids)),
        Route("/api/image/{id}", guarded(image)),
        Route("/api/dedupe", guarded(dedupe)),
        Route("/api/history", guarded(history)),
        Route("/media/{kind}/{id}", guarded(media)),
        Route("/api/edit", guarded(edit), methods=["POST"]),
        Route("/api/undo", guarded(undo), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 400: not_found})
    guard = Guard(app, token=token, csrf_token=csrf, hosts=hosts)
    guard.review = state
    return guard
