"""The ``gallerydl`` source: pictures from any URL gallery-dl supports (pixiv, Sankaku, X/Twitter
timelines, boorus, direct links...), with gallery-dl's own configuration and credentials.

gallery-dl (GPL-2.0) is run as a separate program (``python -m gallery_dl``), never imported. It
loads the user's own config files as usual (logins, cookies, per-site options); lorakit adds a
private config on top whose top-level keys (gallery-dl's highest priority) fix where files go, how
they are named and the metadata it writes beside them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from lorakit.plugin_sdk import Item, LorakitError, Param, ParamError, SourceStep, StepContext, atomic_write_text, hookimpl

from . import _gallery_dl
from ._tagging import style_params
from .booru import _CREDENTIAL_WORDS, CATEGORIES, caption_tags, is_loopback_url, post_tags

ENV_PREFIX = "LORAKIT_GALLERY_DL_"
# Environment variable -> gallery-dl option, applied to every site of the run.
ENV_CREDENTIALS = {"USERNAME": "username", "PASSWORD": "password", "COOKIES": "cookies", "API_KEY": "api-key",
                   "USER_ID": "user-id", "REFRESH_TOKEN": "refresh-token"}
# What gallery-dl's path-restrict "ascii" keeps in a file name; everything else becomes "_".
_UNSAFE = re.compile(r"[^0-9A-Za-z_.]")
_KEPT_FIELDS = ("category", "subcategory", "id", "md5", "date", "title", "rating", "width", "height", "extension",
                "search_tags", "user", "author", "artist", "page_url", "post_url", "source")


def _check_urls(urls: list[str]) -> None:
    if not urls:
        raise ValueError("at least one URL")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"http(s) URLs ({url!r} is not one)")


def file_name(category: str, filename: str, extension: str) -> str:
    """The name gallery-dl gives a file under lorakit's config (format and path-restrict "ascii")."""
    return _UNSAFE.sub("_", f"{category}_{filename[:100]}.{extension}")


class GalleryDLSource(SourceStep):
    """Download pictures from any URL gallery-dl knows: a pixiv user or a Sankaku search, an X
    timeline, a booru search or pool, a direct image link. gallery-dl reads its own config as
    usual (gallery-dl's config.json: logins, cookies, per-site options; or the file given in
    gallery_dl_config), so accounts work as they do with gallery-dl itself. Credentials may also
    come from LORAKIT_GALLERY_DL_USERNAME / _PASSWORD / _COOKIES / _API_KEY / _USER_ID /
    _REFRESH_TOKEN, never from pipeline.yaml. Files are kept in the pipeline's cache: a finished
    URL is not asked again unless refresh is set; files already here are not downloaded again.
    Tags the site gives (booru tags; other sites' tag lists) become the caption, and the post's
    metadata goes to meta.gallery_dl. Requests are at least delay seconds apart.
    """

    name = "gallerydl"
    summary = "Download from any gallery-dl URL (pixiv, Sankaku, X...) with its logins."
    version = "1"
    writes = frozenset({"image", "tags", "meta"})
    example = 'lorakit gallerydl raw/ --url "https://www.pixiv.net/en/users/123" --limit 50'
    params = [
        Param("url", list, help="one or more URLs gallery-dl supports (comma-separated on the command line)",
              validate=_check_urls),
        Param("limit", int, 100, "download at most this many files per URL", min=1),
        Param("extensions", list, ["png", "jpg", "jpeg", "webp", "gif"], "file types kept (videos are skipped)"),
        Param("categories", list, ["character", "copyright", "general"],
              "tag categories written to the caption, for sites that have them (boorus)",
              validate=lambda v: _check_categories(v)),
        *style_params("underscores"),
        Param("delay", float, 1.0, "seconds between requests (below 1 only for a server on this machine)", min=0),
        Param("retries", int, 4, "times a failed request is retried", min=0),
        Param("refresh", bool, False, "ask the site again even if this URL already finished once"),
        Param("gallery_dl_config", Path, None,
              "gallery-dl config file to use instead of gallery-dl's usual ones (logins, cookies, site options)"),
    ]

    @classmethod
    def configure(cls, given: dict[str, Any] | None = None, where: str | None = None) -> "GalleryDLSource":
        for key in given or {}:
            if _CREDENTIAL_WORDS.search(str(key)):
                raise ParamError(cls.name, str(key), "***",
                                 f"no credentials here: pipeline.yaml gets shared. Put them in gallery-dl's config "
                                 f"file or in {ENV_PREFIX}USERNAME / {ENV_PREFIX}PASSWORD / {ENV_PREFIX}COOKIES", where)
        step = super().configure(given, where)
        public = [u for u in step.options.url if not is_loopback_url(u)]
        if step.options.delay < 1.0 and public:
            raise ParamError(cls.name, "delay", step.options.delay,
                             f"at least 1 second between requests to a public site ({public[0]})", where)
        if step.options.gallery_dl_config is not None and not Path(step.options.gallery_dl_config).expanduser().is_file():
            raise ParamError(cls.name, "gallery_dl_config", str(step.options.gallery_dl_config), "an existing file", where)
        return step

    def setup(self, ctx: StepContext) -> None:
        import importlib.util

        if importlib.util.find_spec("gallery_dl") is None:  # looked up, never imported
            raise LorakitError(f"gallerydl: gallery-dl is not installed for {sys.executable}; "
                               "install it with: pip install gallery-dl")

    # ----- the run ------------------------------------------------------------------------------
    def _key(self, url: str) -> str:
        o = self.options
        spec = {"url": url, "limit": o.limit, "extensions": sorted(e.lower().lstrip(".") for e in o.extensions)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]

    def produce(self, ctx: StepContext) -> Iterator[Item]:
        files_dir = ctx.work_dir / "files"
        files_dir.mkdir(parents=True, exist_ok=True)
        for url in self.options.url:
            record_path = ctx.work_dir / "urls" / f"{self._key(url)}.json"
            if record_path.is_file() and not self.options.refresh:
                entries = json.loads(record_path.read_text(encoding="utf-8"))["files"]
                if all((files_dir / e["file"]).is_file() for e in entries):
                    ctx.log(f"{len(entries)} files from the finished URL {url} (no request made; use refresh "
                            "to ask again)")
                    for entry in entries:
                        yield self._item(files_dir / entry["file"], entry["post"], url)
                    continue
            entries = []
            for name, post in self._run(ctx, files_dir, url):
                path = files_dir / name
                if not path.is_file():
                    ctx.log(f"{url}: {name} is missing after the download (skipped)")
                    continue
                entries.append({"file": name, "post": post})
                yield self._item(path, post, url)
            if not entries:
                ctx.log(f"{url}: gallery-dl found no files of types {', '.join(self.options.extensions)}")
                continue
            ctx.log(f"{len(entries)} files from {url}")
            atomic_write_text(record_path, json.dumps({"url": url, "finished": time.time(), "files": entries},
                                                      ensure_ascii=False))

    def _item(self, path: Path, post: dict[str, Any], url: str) -> Item:
        o = self.options
        meta = {k: post[k] for k in _KEPT_FIELDS if post.get(k) not in (None, "", [])}
        meta["url"] = url
        if any(post.get(k) for k in ("tags", "tag_string") + tuple(f"tags_{c}" for c in CATEGORIES)):
            meta["tags"] = post_tags(post)
            tags = caption_tags(post, o.categories, o.tag_style, o.escape_parentheses)
        else:
            tags = {}
        item_meta: dict[str, Any] = {"gallery_dl": json.loads(json.dumps(meta, default=str))}
        source = post.get("post_url") or post.get("page_url") or url
        return Item(name=path.stem, path=path, tags=tags, meta=item_meta, source=str(source))

    def gallery_dl_config(self, files_dir: Path, progress_dir: Path) -> dict[str, Any]:
        """lorakit's config, top-level keys only: they win over anything in the user's config."""
        o = self.options
        exts = tuple(sorted({e.lower().lstrip(".") for e in o.extensions}))
        config: dict[str, Any] = {
            "base-directory": str(files_dir),
            "directory": [],
            "filename": "{category}_{filename[:100]}.{extension}",
            "path-restrict": "ascii",
            "skip": True,
            "sleep-request": o.delay,
            "sleep": o.delay,
            "retries": o.retries,
            "timeout": 60,
            "image-filter": f"extension.lower() in {exts!r}",
            "image-range": f"1-{o.limit}",
            "postprocessors": [{"name": "metadata", "mode": "jsonl", "event": ["after", "skip"],
                                "base-directory": str(progress_dir), "filename": _gallery_dl.PROGRESS_FILE}],
            "output": {"mode": "null", "progress": False, "log": "[{name}][{levelname}] {message}"},
            "downloader": {"part": True, "mtime": False, "retries": o.retries},
        }
        for var, key in ENV_CREDENTIALS.items():
            value = os.environ.get(ENV_PREFIX + var)
            if value:
                config[key] = value
        return config

    def _run(self, ctx: StepContext, files_dir: Path, url: str) -> Iterator[tuple[str, dict]]:
        config_args = []
        if self.options.gallery_dl_config is not None:
            config_args = ["--config-ignore", "--config", str(Path(self.options.gallery_dl_config).expanduser())]
        for post in _gallery_dl.run(lambda run_dir: self.gallery_dl_config(files_dir, run_dir), url, ctx.tmp_dir,
                                    prefix="gallerydl", config_args=config_args,
                                    explain=lambda code, errors: explain(url, code, errors)):
            name = file_name(str(post.get("category", "")), str(post.get("filename", "")),
                             str(post.get("extension", "")))
            yield name, post


def explain(url: str, code: int, stderr_lines: list[str]) -> str:
    """One sentence from gallery-dl's exit status and error lines."""
    lines = [line.strip() for line in stderr_lines if line.strip()]
    errors = [line for line in lines if "[error]" in line] or lines[-3:]
    text = " ".join(re.sub(r"^(\[[^\]]*\])+\s*", "", line) for line in errors) or "no message"
    if "Unsupported URL" in text or code & 64:
        return (f"gallerydl: gallery-dl does not support {url} ({text}). `gallery-dl --list-extractors` lists the "
                "sites it knows; a self-hosted booru needs its root in gallery-dl's config")
    if code & 16 or re.search(r"\b40[13]\b|AuthRequired|AuthorizationError|login", text, re.IGNORECASE):
        return (f"gallerydl: {url}: the site wants a login ({text}). Put credentials or cookies in gallery-dl's "
                f"config file, or set {ENV_PREFIX}USERNAME / {ENV_PREFIX}PASSWORD / {ENV_PREFIX}COOKIES")
    return f"gallerydl: {url}: gallery-dl failed (exit status {code}): {text}"


def _check_categories(values: list[str]) -> None:
    bad = [v for v in values if v not in CATEGORIES]
    if bad:
        raise ValueError(f"tag categories among {', '.join(CATEGORIES)} (not {', '.join(bad)})")


@hookimpl
def register_steps(register):
    register(GalleryDLSource)
