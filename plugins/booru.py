"""Booru grabber: download a tag search from Danbooru, Gelbooru, Moebooru sites (or a self-hosted
instance) with their tags as captions and the post metadata in the manifest.

gallery-dl (GPL-2.0) does the downloading. It is run as a separate program
(``python -m gallery_dl``) with a configuration file this module writes; it is never imported.
The files go to the step's persistent work folder, named by md5, so a second run skips what it
already has, and a finished search is remembered so a re-run needs no network at all.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, urlsplit

from lorakit.plugin_sdk import (
    Item,
    file_digest,
    LorakitError,
    Param,
    ParamError,
    SourceStep,
    StepContext,
    atomic_path,
    atomic_write_text,
    hookimpl,
    is_partial_file,
)
from lorakit.plugins import _gallery_dl
from lorakit.plugins._tagging import format_tag, is_namespaced, style_params, unique_tags

ENGINES = ("danbooru", "moebooru", "gelbooru_v02", "gelbooru")
CATEGORIES = ("character", "copyright", "artist", "general", "meta")
# gallery-dl's config key for extra instances of each engine (its "basecategory").
_ENGINE_CONFIG_KEY = {"danbooru": "Danbooru", "moebooru": "moebooru", "gelbooru_v02": "gelbooru_v02"}
_CUSTOM_CATEGORY = "lorakit_booru"
_CREDENTIAL_KEYS = ("username", "password", "api-key", "user-id", "cookies")


@dataclass(frozen=True)
class Site:
    """One booru: gallery-dl's name for it, its engine and its root URL."""

    category: str
    engine: str
    root: str
    custom: bool = False

    def search_url(self, tags: str) -> str:
        q = quote(tags, safe="")
        if self.engine == "danbooru":
            return f"{self.root}/posts?tags={q}"
        if self.engine == "moebooru":
            return f"{self.root}/post?tags={q}"
        return f"{self.root}/index.php?page=post&s=list&tags={q}"

    def post_url(self, post_id: Any) -> str:
        if self.engine == "danbooru":
            return f"{self.root}/posts/{post_id}"
        if self.engine == "moebooru":
            return f"{self.root}/post/show/{post_id}"
        return f"{self.root}/index.php?page=post&s=view&id={post_id}"

    @property
    def env_prefix(self) -> str:
        name = "BOORU" if self.custom else re.sub(r"[^A-Z0-9]", "_", self.category.upper())
        return f"LORAKIT_{name}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback_url(self.root)


# Second-level labels under which a country's registry sells names (example.co.uk, example.com.au,
# example.ne.jp): the site's own domain is then three labels long, so files from cdn.example.co.uk
# pass and files from another.co.uk do not.
_SECOND_LEVEL = {"co", "com", "net", "org", "ac", "gov", "edu", "ne", "or", "go", "gr", "ed", "lg", "ltd", "plc"}


def site_domain(host: str) -> str:
    """The domain a site's own hosts share: ``danbooru.donmai.us`` -> ``donmai.us``,
    ``img.example.co.uk`` -> ``example.co.uk``. A heuristic, not the public suffix list: a two-letter
    country code under a generic second-level label takes three labels."""
    labels = host.lower().strip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def is_loopback_url(url: str) -> bool:
    """True for a URL on this machine (localhost, 127.0.0.0/8, ::1): test servers, never a real site."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Sites known by name. "safebooru" is safebooru.org (a Gelbooru 0.2 site); Danbooru's safe mirror
# is "safebooru.donmai.us".
SITES = {
    "danbooru": Site("danbooru", "danbooru", "https://danbooru.donmai.us"),
    "safebooru.donmai.us": Site("danbooru", "danbooru", "https://safebooru.donmai.us"),
    "aibooru": Site("aibooru", "danbooru", "https://aibooru.online"),
    "gelbooru": Site("gelbooru", "gelbooru", "https://gelbooru.com"),
    "safebooru": Site("safebooru", "gelbooru_v02", "https://safebooru.org"),
    "tbib": Site("tbib", "gelbooru_v02", "https://tbib.org"),
    "xbooru": Site("xbooru", "gelbooru_v02", "https://xbooru.com"),
    "yandere": Site("yandere", "moebooru", "https://yande.re"),
    "yande.re": Site("yandere", "moebooru", "https://yande.re"),
    "konachan": Site("konachan", "moebooru", "https://konachan.com"),
    "sakugabooru": Site("sakugabooru", "moebooru", "https://www.sakugabooru.com"),
}

# Parameter names that look like credentials: refused in pipeline.yaml, which gets shared.
_CREDENTIAL_WORDS = re.compile(r"pass|secret|token|key|login|user(name|[_-]?id)?$|cookie|auth|cred|session|sid$",
                               re.IGNORECASE)
# Query parameters that carry credentials in API URLs (Gelbooru's api_key/user_id, Danbooru's login/api_key).
_SECRET_QUERY = re.compile(r"(?i)\b(api[_-]?key|user[_-]?id|login|password|pass_hash|token|session|auth)=[^&\s'\"]+")

# Post fields kept in the manifest (meta["booru"]); the rest of the post JSON is left out.
_KEPT_FIELDS = ("id", "md5", "rating", "score", "fav_count", "source", "created_at", "parent_id", "pixiv_id",
                "image_width", "image_height", "width", "height", "file_url", "file_ext", "extension",
                "file_size", "search_tags")
_RATINGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit", "safe": "general",
            "general": "general", "sensitive": "sensitive", "questionable": "questionable", "explicit": "explicit"}


def normalise_rating(value: Any, engine: str) -> Any:
    """Danbooru's rating words (general, sensitive, questionable, explicit), as wd14 writes them.

    On Danbooru ``s`` is *sensitive*; on Moebooru and older Gelbooru sites ``s`` is *safe* (general).
    """
    key = str(value).strip().lower()
    if key == "s" and engine != "danbooru":
        return "general"
    return _RATINGS.get(key, value)


def parse_site(spec: str, engine: str = "danbooru") -> Site:
    """A site name (``danbooru``) or the root URL of an instance (``https://booru.example.org``)."""
    key = spec.strip().lower()
    if key in SITES:
        return SITES[key]
    parts = urlsplit(spec.strip())
    if "@" in parts.netloc:
        raise ValueError("a site URL without a user name or password in it (user:pass@ ends up in logs and the "
                         "manifest): set LORAKIT_BOORU_LOGIN / LORAKIT_BOORU_API_KEY instead")
    if parts.scheme in ("http", "https") and parts.netloc:
        if engine not in _ENGINE_CONFIG_KEY:
            raise ValueError(f"a self-hosted instance must use engine danbooru, moebooru or gelbooru_v02, not {engine}")
        root = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        for site in SITES.values():  # a known site given by its URL
            if site.root == root:
                return site
        return Site(_CUSTOM_CATEGORY, engine, root, custom=True)
    raise ValueError(f"expected a site name ({', '.join(sorted(SITES))}) or a root URL such as https://booru.example.org")


def _check_site(value: str) -> None:
    parse_site(value, "danbooru")


def post_tags(post: dict[str, Any]) -> dict[str, list[str]]:
    """The post's tags by category, from gallery-dl's ``tags_<category>`` or Danbooru's
    ``tag_string_<category>`` fields; a site without categories gives everything as general."""
    if isinstance(post.get("tags"), dict):  # already by category (a post kept in the manifest)
        return {str(k): [str(t) for t in v] for k, v in post["tags"].items()}
    out: dict[str, list[str]] = {}
    aliases = {"character": ("character",), "copyright": ("copyright",), "artist": ("artist", "circle"),
               "general": ("general",), "meta": ("meta", "metadata")}
    for category, names in aliases.items():
        for name in names:
            for key in (f"tags_{name}", f"tag_string_{name}"):
                value = post.get(key)
                if value:
                    out.setdefault(category, []).extend(value.split() if isinstance(value, str) else list(value))
                    break
            else:
                continue
            break
    if not out:
        value = post.get("tags") or post.get("tag_string") or ""
        out["general"] = value.split() if isinstance(value, str) else list(value)
    return out


def caption_tags(post: dict[str, Any], categories: list[str], style: str, escape: bool) -> dict[str, None]:
    """The caption's tags: chosen categories in the given order, namespaced tags dropped."""
    by_category = post_tags(post)
    chosen = [t for c in categories for t in by_category.get(c, []) if t and not is_namespaced(t)]
    return {format_tag(t, style, escape): None for t in unique_tags(chosen)}


class BooruStep(SourceStep):
    """Download pictures from a booru tag search, with the booru's tags as the caption.

    SITE is danbooru, gelbooru, safebooru (safebooru.org), yandere, konachan, ... or the root URL of
    a self-hosted Danbooru, Moebooru or Gelbooru 0.2 instance (say which with --engine). Files are
    named by their md5 and kept in the pipeline's cache: a second run downloads only what is
    missing, and a search that finished once is not asked again unless --refresh is given.
    Requests are at least one second apart. Credentials come from gallery-dl's own config file or
    from LORAKIT_<SITE>_LOGIN / LORAKIT_<SITE>_API_KEY (Gelbooru: _USER_ID / _API_KEY), never
    from pipeline.yaml. Danbooru searches two tags without an account: put more in --local-tags,
    checked on this machine before anything is downloaded.
    """

    name = "booru"
    summary = "Download a booru tag search (Danbooru, Gelbooru, Moebooru) with tags as captions."
    version = "1"
    writes = frozenset({"image", "tags", "meta"})
    example = 'lorakit booru dataset/ --site danbooru --tags "hatsune_miku solo" --limit 50'
    params = [
        Param("site", str, "danbooru", "site name (danbooru, gelbooru, safebooru, yandere, konachan, ...) "
              "or the root URL of a self-hosted instance", validate=_check_site, type_name="a site name or URL"),
        Param("tags", str, help="the search, as typed on the site, e.g. '1girl solo -rating:explicit'"),
        Param("local_tags", str, "",
              "more tags checked on this machine instead of by the site (Danbooru searches two tags without "
              "an account): plain tags, -tag to exclude, rating:x / -rating:x; e.g. 'solo -monochrome'",
              validate=lambda v: local_filter(v)),
        Param("limit", int, 100, "download at most this many pictures", min=1),
        Param("categories", list, ["character", "copyright", "general"],
              "tag categories written to the caption, in this order (character, copyright, artist, general, meta)",
              validate=lambda v: _check_categories(v)),
        *style_params("underscores"),
        Param("engine", str, "danbooru", "software of a self-hosted instance given by URL", choices=ENGINES[:3]),
        Param("delay", float, 1.0, "seconds between requests (below 1 only for a server on this machine)", min=0),
        Param("retries", int, 4, "times a failed request is retried before giving up", min=0),
        Param("extensions", list, ["png", "jpg", "jpeg", "webp", "gif"], "file types kept (videos are skipped)"),
        Param("refresh", bool, False, "ask the site again even if this search already finished once"),
        Param("timeout", float, 60.0, "seconds one file may take to download, and the site may stay silent, "
              "before that post is set aside (or the search stops)", min=1),
        Param("max_file_mb", float, 50.0, "largest file downloaded, in MB: bigger posts are set aside", min=0.001),
        Param("allowed_hosts", list, [], "other hosts files may be downloaded from (the site's own host and its "
              "subdomains always are), e.g. [cdn.example.org]"),
        Param("gallery_dl_config", Path, None,
              "gallery-dl config file to take credentials from (default: gallery-dl's usual locations)"),
    ]

    @classmethod
    def configure(cls, given: dict[str, Any] | None = None, where: str | None = None) -> "BooruStep":
        site_value = str((given or {}).get("site", ""))
        if "@" in urlsplit(site_value.strip()).netloc:
            raise ParamError(cls.name, "site", redact_url(site_value),
                             "a site URL without user:password@ in it (it would end up in logs and the manifest): "
                             "set LORAKIT_BOORU_LOGIN / LORAKIT_BOORU_API_KEY instead", where)
        for key in given or {}:
            if _CREDENTIAL_WORDS.search(str(key)):
                raise ParamError(
                    cls.name, str(key), "***",
                    "no credentials here: pipeline.yaml gets shared. Set LORAKIT_<SITE>_LOGIN and "
                    "LORAKIT_<SITE>_API_KEY (e.g. LORAKIT_DANBOORU_API_KEY) in the environment, or put them in "
                    "gallery-dl's config file", where)
        step = super().configure(given, where)
        site = step.site
        if step.options.delay < 1.0 and not site.is_loopback:
            raise ParamError(cls.name, "delay", step.options.delay,
                             "at least 1 second between requests to a public site (be polite)", where)
        return step

    def setup(self, ctx: StepContext) -> None:
        import importlib.util

        # Look for gallery-dl without importing it (it runs as its own program).
        if importlib.util.find_spec("gallery_dl") is None:
            raise LorakitError(f"booru: gallery-dl is not installed for {sys.executable}; "
                               "install it with: pip install gallery-dl")

    @property
    def site(self) -> Site:
        return parse_site(self.options.site, self.options.engine)

    # ----- the search record: what a finished search returned, so a re-run needs no network ------
    def _search_key(self) -> str:
        o = self.options
        spec = {"root": self.site.root, "engine": self.site.engine, "tags": " ".join(o.tags.split()),
                "local_tags": " ".join(o.local_tags.split()),
                "limit": o.limit, "extensions": sorted(e.lower().lstrip(".") for e in o.extensions)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]

    def _site_dir(self, ctx: StepContext) -> Path:
        site = self.site
        slug = re.sub(r"[^a-z0-9]+", "_", urlsplit(site.root).netloc.lower()).strip("_") or site.category
        return ctx.work_dir / slug

    def produce(self, ctx: StepContext) -> Iterator[Item]:
        o = self.options
        site_dir = self._site_dir(ctx)
        files_dir = site_dir / "files"
        record_path = site_dir / "searches" / f"{self._search_key()}.json"
        files_dir.mkdir(parents=True, exist_ok=True)

        if record_path.is_file() and not o.refresh:
            posts = json.loads(record_path.read_text(encoding="utf-8"))["posts"]
            if all(self._file_of(files_dir, p).is_file() for p in posts):
                ctx.log(f"{len(posts)} pictures from the finished search '{o.tags}' on {self.site.root} "
                        "(no request made; use refresh to ask the site again)")
                for post in posts:
                    item = self._item(files_dir, post, ctx)
                    if item is not None:
                        yield item
                return

        posts = []
        downloaded = skipped = 0
        complete = True
        for leftover in files_dir.iterdir():  # a download a killed run left half-written
            if is_partial_file(leftover):
                leftover.unlink(missing_ok=True)
        downloader = _Downloader(self.site, o, self._credentials().values())
        for post in self._run_gallery_dl(ctx, files_dir, site_dir):
            if post is _STALLED:
                complete = False
                ctx.log(f"the site sent nothing for {o.timeout:g} s: the search stopped after {len(posts)} "
                        "picture(s); run again to continue")
                continue
            was_skipped = self._has_file(files_dir, post)
            if not was_skipped:
                try:
                    downloader.fetch(post, files_dir)
                except DownloadRefused as exc:
                    complete = False  # not remembered as finished: the next run tries again
                    url = self.site.post_url(post.get("id"))
                    ctx.set_aside(Item(name=str(post.get("md5") or post.get("id")), path=Path(url), source=url),
                                  f"post {post.get('id')}: {exc}")
                    continue
            item = self._item(files_dir, post, ctx)
            if item is None:
                complete = False  # not remembered as finished: the next run asks again
                continue
            posts.append(item.meta["booru"])
            skipped += was_skipped
            downloaded += not was_skipped
            yield item
        if not posts and downloader.refused:
            raise LorakitError(f"booru: no picture of '{o.tags}' on {self.site.root} could be downloaded; "
                               f"the first reason: {downloader.refused[0]}")
        if not posts and not complete:
            raise LorakitError(f"booru: {self.site.root} did not answer within {o.timeout:g} s (tags '{o.tags}'); "
                               "try again later, or raise timeout")
        if not posts:
            raise LorakitError(
                f"booru: no posts on {self.site.root} match '{o.tags}' (with file types "
                f"{', '.join(o.extensions)}). Check the tags' spelling on the site; Danbooru allows two tags "
                "per search without an account.")
        ctx.log(f"{len(posts)} pictures for '{o.tags}' from {self.site.root}: {downloaded} downloaded, "
                f"{skipped} already here")
        if complete:
            record = {"site": self.site.root, "tags": o.tags, "limit": o.limit, "finished": time.time(), "posts": posts}
            atomic_write_text(record_path, json.dumps(record, ensure_ascii=False, indent=1))
        else:
            record_path.unlink(missing_ok=True)

    # ----- items ----------------------------------------------------------------------------------
    def _has_file(self, files_dir: Path, post: dict[str, Any]) -> bool:
        md5, ext = str(post.get("md5") or ""), str(post.get("extension") or post.get("file_ext") or "")
        return bool(md5 and ext) and (files_dir / f"{md5}.{ext.lower()}").is_file()

    @staticmethod
    def _file_of(files_dir: Path, post: dict[str, Any]) -> Path:
        return files_dir / f"{post['md5']}.{str(post['extension']).lower()}"

    def _item(self, files_dir: Path, post: dict[str, Any], ctx: StepContext) -> Item | None:
        o = self.options
        md5 = str(post.get("md5") or "")
        ext = str(post.get("extension") or post.get("file_ext") or "")
        if not re.fullmatch(r"[0-9a-f]{32}", md5) or not re.fullmatch(r"[A-Za-z0-9]{1,5}", ext):
            ctx.log(f"post {post.get('id')}: skipped, no usable md5/extension in the site's answer")
            return None
        post = dict(post, md5=md5, extension=ext.lower())
        path = self._file_of(files_dir, post)
        if not path.is_file():
            ctx.log(f"post {post.get('id')}: {path.name} is missing (download failed?)")
            return None
        if _md5_of(path) != md5:
            path.unlink()  # a damaged download: the next run fetches it again
            ctx.log(f"post {post.get('id')}: {path.name} does not match its md5; deleted, run again to re-download")
            return None
        meta = {k: post[k] for k in _KEPT_FIELDS if post.get(k) not in (None, "")}
        meta["site"] = self.site.root
        meta["post_url"] = self.site.post_url(post.get("id"))
        meta["tags"] = post_tags(post)
        if "rating" in meta:
            meta["rating"] = normalise_rating(meta["rating"], self.site.engine)
        item_meta = {"booru": meta}
        if "rating" in meta:
            item_meta["rating"] = meta["rating"]
        return Item(name=md5, path=path, tags=caption_tags(post, o.categories, o.tag_style, o.escape_parentheses),
                    meta=item_meta, source=meta["post_url"])

    # ----- gallery-dl -----------------------------------------------------------------------------
    def _credentials(self) -> dict[str, str]:
        """Credentials for gallery-dl: the user's gallery-dl config, then the environment (wins)."""
        site = self.site
        found: dict[str, str] = {}
        for path in _user_config_files(self.options.gallery_dl_config):
            section = _load_config(path).get("extractor", {})
            if not isinstance(section, dict):
                continue
            names = [site.category]
            if site.custom:  # the user's own name for this instance: extractor.<Engine>.<name>.root
                instances = section.get(_ENGINE_CONFIG_KEY[site.engine], {})
                names = [name for name, info in (instances.items() if isinstance(instances, dict) else [])
                         if isinstance(info, dict) and str(info.get("root", "")).rstrip("/") == site.root]
            for name in names:
                values = section.get(name, {})
                if isinstance(values, dict):
                    found.update({k: v for k, v in values.items() if k in _CREDENTIAL_KEYS and v})
        env = os.environ
        pre = site.env_prefix
        if site.engine in ("gelbooru", "gelbooru_v02"):
            pairs = {"user-id": f"{pre}_USER_ID", "api-key": f"{pre}_API_KEY"}
        else:
            pairs = {"username": f"{pre}_LOGIN", "password": f"{pre}_API_KEY"}
        for key, var in pairs.items():
            if env.get(var):
                found[key] = env[var]
        return found

    def gallery_dl_config(self, files_dir: Path, progress_dir: Path) -> dict[str, Any]:
        """The generated gallery-dl configuration (credentials are added separately)."""
        o = self.options
        site = self.site
        exts = tuple(sorted({e.lower().lstrip(".") for e in o.extensions}))
        options: dict[str, Any] = {
            "base-directory": str(files_dir),
            "directory": [],
            "filename": "{md5}.{extension!l}",
            "download": False,  # gallery-dl reads the API; lorakit downloads each file (caps, timeouts, hosts)
            "sleep-request": o.delay,
            "sleep": o.delay,
            "sleep-429": max(o.delay, 60.0) if o.retries else o.delay,
            "retries": o.retries,
            "timeout": o.timeout,
            "image-filter": [f"extension.lower() in {exts!r}", *local_filter(o.local_tags)],
            "image-range": f"1-{o.limit}",
            "tags": site.engine != "danbooru",  # other engines: fetch tag categories (one page per post)
            "postprocessors": [{
                "name": "metadata", "mode": "jsonl", "event": ["after", "skip"],
                "base-directory": str(progress_dir), "filename": _gallery_dl.PROGRESS_FILE,
            }],
        }
        extractor: dict[str, Any] = {site.category: options}
        if site.custom:
            extractor[_ENGINE_CONFIG_KEY[site.engine]] = {site.category: {"root": site.root}}
        return {
            "extractor": extractor,
            "downloader": {"part": True, "mtime": False, "retries": o.retries},
            "output": {"mode": "null", "progress": False, "log": "[{name}][{levelname}] {message}"},
        }

    def _run_gallery_dl(self, ctx: StepContext, files_dir: Path, site_dir: Path) -> Iterator[dict]:
        """Run gallery-dl over the search (metadata only); yield each post's metadata as it arrives, and
        ``_STALLED`` if the site went silent for longer than ``timeout``."""
        site, o = self.site, self.options
        creds = self._credentials()

        def make_config(run_dir: Path) -> dict[str, Any]:
            config = self.gallery_dl_config(files_dir, run_dir)
            if creds:
                config["extractor"][site.category].update(creds)
            return config

        yield from _gallery_dl.run(
            make_config, site.search_url(o.tags), ctx.tmp_dir, prefix="booru", config_args=["--config-ignore"],
            silence_s=lambda started: o.timeout + o.delay + (0 if started else _gallery_dl.START_S),
            explain=lambda code, errors: scrub(explain_failure(site, o, code, errors), list(creds.values())))


_STALLED = _gallery_dl.STALLED  # yielded by _run_gallery_dl when the site went silent


class DownloadRefused(Exception):
    """One post's file is not downloaded (too big, too slow, another host, an HTTP error): set aside."""


class _NoForeignRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a host the downloader allows."""

    def __init__(self, allowed):
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not self.allowed(newurl):
            raise DownloadRefused(f"redirected to {redact_url(newurl)}, which is not one of the site's hosts "
                                  "(add it to allowed_hosts if you trust it)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Downloader:
    """Downloads post files with a size cap, a time limit per file and an allow-list of hosts.

    The file is written under a temporary name and renamed when complete (atomic_path), so a refused
    or interrupted download leaves nothing behind."""

    def __init__(self, site: Site, options, secrets=()):
        self.site, self.options = site, options
        self.secrets = [str(v) for v in secrets if v]
        self.refused: list[str] = []
        self._last = 0.0
        self._opener = urllib.request.build_opener(_NoForeignRedirects(self.allowed))

    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
            return False
        site_host = (urlsplit(self.site.root).hostname or "").lower()
        extra = {h.lower().strip() for h in self.options.allowed_hosts}
        if host == site_host or host in extra:
            return True
        try:  # an address is only ever itself
            ipaddress.ip_address(site_host)
            return False
        except ValueError:
            pass
        base = site_domain(site_host)  # danbooru.donmai.us -> donmai.us (cdn.donmai.us)
        return host == base or host.endswith("." + base)

    def fetch(self, post: dict[str, Any], files_dir: Path) -> Path:
        try:
            return self._fetch(post, files_dir)
        except DownloadRefused as exc:
            self.refused.append(scrub(str(exc), self.secrets))
            raise DownloadRefused(self.refused[-1]) from None

    def _fetch(self, post: dict[str, Any], files_dir: Path) -> Path:
        o = self.options
        url = str(post.get("file_url") or "")
        md5, ext = str(post.get("md5") or ""), str(post.get("extension") or post.get("file_ext") or "").lower()
        if not url or not re.fullmatch(r"[0-9a-f]{32}", md5) or not re.fullmatch(r"[a-z0-9]{1,5}", ext):
            raise DownloadRefused("the site gave no file URL (restricted or deleted post?)")
        if url.startswith("//"):
            url = urlsplit(self.site.root).scheme + ":" + url
        if not self.allowed(url):
            raise DownloadRefused(f"its file is on {urlsplit(url).hostname}, not one of the site's hosts "
                                  "(add it to allowed_hosts if you trust it)")
        cap = int(o.max_file_mb * 1024 * 1024)
        declared = post.get("file_size")
        if isinstance(declared, int) and declared > cap:
            raise DownloadRefused(f"file is {declared / 1e6:.1f} MB, over max_file_mb={o.max_file_mb:g}")
        wait_for = self._last + o.delay - time.monotonic()
        if wait_for > 0:
            time.sleep(wait_for)  # polite: requests at least `delay` seconds apart
        target = files_dir / f"{md5}.{ext}"
        for attempt in range(o.retries + 1):
            self._last = time.monotonic()
            try:
                self._get(url, target, cap)
                return target
            except DownloadRefused:
                raise
            except (OSError, urllib.error.URLError) as exc:  # connection trouble or HTTP 5xx: retried
                if attempt == o.retries:
                    raise DownloadRefused(f"download failed ({scrub(str(exc), self.secrets)})") from None
                time.sleep(max(o.delay, 1.0))
        return target

    def _get(self, url: str, target: Path, cap: int) -> None:
        o = self.options
        deadline = time.monotonic() + o.timeout
        request = urllib.request.Request(url, headers={"User-Agent": "lorakit (gallery-dl search)"})
        try:
            response = self._opener.open(request, timeout=o.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise
            raise DownloadRefused(f"HTTP {exc.code} {exc.reason} for its file") from None
        with response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cap:
                raise DownloadRefused(f"file is {int(length) / 1e6:.1f} MB, over max_file_mb={o.max_file_mb:g}")
            received = 0
            with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                while True:
                    if time.monotonic() > deadline:
                        raise DownloadRefused(f"download took longer than timeout={o.timeout:g} s")
                    block = response.read1(1 << 16) if hasattr(response, "read1") else response.read(1 << 16)
                    if not block:
                        break
                    received += len(block)
                    if received > cap:
                        raise DownloadRefused(f"file is over max_file_mb={o.max_file_mb:g} (stopped at "
                                              f"{received / 1e6:.1f} MB)")
                    fh.write(block)


def redact_url(url: str) -> str:
    """``url`` without a user name or password in it."""
    parts = urlsplit(url.strip())
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def scrub(text: str, secrets=()) -> str:
    """``text`` with credentials removed: userinfo in URLs, secret query parameters, and known values."""
    text = re.sub(r"(https?://)[^/@\s'\"]+@", r"\1***@", text)
    text = _SECRET_QUERY.sub(lambda m: m.group(1) + "=***", text)
    for value in secrets:
        if value and len(str(value)) >= 4:
            text = text.replace(str(value), "***")
    return text


def explain_failure(site: Site, options, code: int, stderr_lines: list[str]) -> str:
    """One clear sentence from gallery-dl's exit status and error lines."""
    lines = [line.strip() for line in stderr_lines if line.strip()]
    errors = [line for line in lines if "[error]" in line] or lines[-3:]
    text = " ".join(re.sub(r"^(\[[^\]]*\])+\s*", "", line) for line in errors)
    where = f"booru ({site.root}, tags '{options.tags}')"
    http = re.search(r"'(\d{3}) ([^']*)' for '([^']*)'", text)
    if http:
        status, reason, url = int(http.group(1)), http.group(2), http.group(3)
        if status == 429:
            return (f"{where}: rate limited (HTTP 429 {reason} for {url}). Wait a while and run again (downloaded "
                    f"files are kept), raise delay (now {options.delay:g}s), or log in for a higher limit "
                    f"({site.env_prefix}_LOGIN / {site.env_prefix}_API_KEY).")
        if status in (401, 403):
            return (f"{where}: access refused (HTTP {status} {reason} for {url}). The site wants a login or blocks "
                    f"this client: set {site.env_prefix}_LOGIN / {site.env_prefix}_API_KEY or put credentials in "
                    "gallery-dl's config file.")
        if status == 422:
            return (f"{where}: the site refused the search (HTTP 422 {reason} for {url}). Danbooru allows two "
                    "tags per search without an account (six with Gold): move the others to local_tags, "
                    "or log in.")
        if status >= 500:
            return (f"{where}: the site failed (HTTP {status} {reason} for {url}) after {options.retries} "
                    "retries. Try again later; downloaded files are kept.")
        return f"{where}: HTTP {status} {reason} for {url}."
    if "Unsupported URL" in text:
        return f"{where}: gallery-dl does not recognise the search URL {site.search_url(options.tags)} ({text})"
    if "ConnectionError" in text or "ConnectTimeout" in text or "NameResolutionError" in text:
        return f"{where}: cannot reach the site ({text}). Check the address and your connection."
    return f"{where}: gallery-dl failed (exit status {code}): {text or 'no message'}"


_RATING_LETTERS = {"g": "g", "general": "g", "s": "s", "sensitive": "s", "safe": "s", "q": "q",
                   "questionable": "q", "e": "e", "explicit": "e"}


def local_filter(spec: str) -> list[str]:
    """gallery-dl filter expressions for tags checked locally (``solo -monochrome -rating:e``).

    Each post's ``tags`` (a list on Danbooru, a space-separated string elsewhere) must hold every
    plain tag and none of the ``-`` ones; ``rating:`` compares the post's rating letter.
    """
    required, excluded, ratings_in, ratings_out = set(), set(), set(), set()
    for word in spec.split():
        negated = word.startswith("-")
        tag = word[1:] if negated else word
        if not tag:
            continue
        head, sep, value = tag.partition(":")
        if sep and head.lower() == "rating":
            letters = set()
            for r in value.lower().split(","):
                if r not in _RATING_LETTERS:
                    raise ValueError(f"a rating among general, sensitive, questionable, explicit, not {r!r}")
                letters.add(_RATING_LETTERS[r])
            (ratings_out if negated else ratings_in).update(letters)
        elif is_namespaced(tag):
            raise ValueError(f"plain tags, -tags and rating: (the site's other metatags such as {tag!r} "
                             "only work in 'tags')")
        else:
            (excluded if negated else required).add(tag.lower())
    post_tags_expr = "set(tags.split() if isinstance(tags, str) else tags)"
    exprs = []
    if required:
        exprs.append(f"set({sorted(required)!r}) <= {post_tags_expr}")
    if excluded:
        exprs.append(f"not (set({sorted(excluded)!r}) & {post_tags_expr})")
    if ratings_in:
        exprs.append(f"str(rating)[:1].lower() in {sorted(ratings_in)!r}")
    if ratings_out:
        exprs.append(f"str(rating)[:1].lower() not in {sorted(ratings_out)!r}")
    return exprs


def _check_categories(values: list[str]) -> None:
    bad = [v for v in values if v not in CATEGORIES]
    if bad:
        raise ValueError(f"tag categories among {', '.join(CATEGORIES)} (not {', '.join(bad)})")


def _md5_of(path: Path) -> str:
    return file_digest(path, "md5")


def _user_config_files(explicit: Path | None) -> list[Path]:
    """gallery-dl's own config files, where the user keeps credentials (or the one given)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise LorakitError(f"booru: gallery-dl config file {path} does not exist")
        return [path]
    home = Path.home()
    if os.name == "nt":
        candidates = [Path(os.environ.get("APPDATA", home)) / "gallery-dl" / "config.json",
                      home / "gallery-dl" / "config.json", home / "gallery-dl.conf"]
    else:
        xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
        candidates = [Path("/etc/gallery-dl.conf"), xdg / "gallery-dl" / "config.json", home / ".gallery-dl.conf"]
    return [p for p in candidates if p.is_file()]


def _load_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise LorakitError(f"booru: cannot read gallery-dl config {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


@hookimpl
def register_steps(register):
    register(BooruStep)


__all__ = ["BooruStep", "Site", "parse_site", "post_tags", "caption_tags", "local_filter", "normalise_rating",
           "explain_failure"]
