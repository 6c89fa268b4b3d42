"""Built-in sources: a local folder of images, and an existing kohya dataset."""
from __future__ import annotations

import os
from pathlib import Path

from lorakit.kohya import read_kohya
from lorakit.plugin_sdk import (
    IMAGE_EXTENSIONS, CaptionError, Item, LorakitError, Param, SourceStep, hookimpl, is_within, read_caption,
)


def _existing(path: Path) -> None:
    if not Path(path).exists():
        raise ValueError(f"an existing folder ({path} does not exist)")


def _caption_tags(text: str | None) -> dict[str, None]:
    """Tags of a caption file; a keep-tokens separator ``|||`` stays in place as its own entry."""
    if not text:
        return {}
    return {t.strip(): None for t in text.replace("|||", ",|||,").split(",") if t.strip()}


class FolderSource(SourceStep):
    """Read every image under a folder (recursively by default). Sub-folders are kept in the output
    names, so `lorakit trim in/ out/` mirrors in/'s layout. A same-stem caption file beside an image
    (`a.png` + `a.txt`) becomes its tags. The folder itself is never written to."""

    name = "folder"
    summary = "Images from a local folder (with same-stem .txt captions when present)."
    params = [
        Param("path", Path, help="the folder to read", validate=_existing),
        Param("recursive", bool, True, "also read sub-folders"),
        Param("caption_extension", str, ".txt", "extension of caption files beside the images"),
        Param("subfolders_as_subsets", bool, False, "each first-level sub-folder becomes its own subset"),
    ]
    writes = frozenset({"image", "caption", "tags", "subset"})
    example = "sources:\n  - folder: {path: raw/outfit1, subset: outfit1}"

    def inputs(self) -> list[Path]:
        return [self.options.path]

    def fingerprint(self) -> str | None:
        from lorakit.unchanged import folder_fingerprint

        root = self.options.path
        return folder_fingerprint(root, self.options.recursive) if os.path.isdir(root) else None

    def produce(self, ctx):
        root: Path = self.options.path
        if not root.is_dir():
            raise LorakitError(f"{root}: source folder does not exist" if not root.exists() else f"{root}: not a folder")
        files = _image_files(str(root), self.options.recursive)
        if not files:
            ctx.log(f"no images found in {root}")
        real_root = os.path.realpath(root)
        cap_ext = self.options.caption_extension
        for rel, entry, siblings in files:
            stem = os.path.splitext(rel)[0]
            subset, name = "default", stem
            if self.options.subfolders_as_subsets and "/" in stem:
                subset, name = stem.split("/", 1)
            path = Path(entry.path)
            cap_name = os.path.splitext(entry.name)[0] + cap_ext if cap_ext.startswith(".") else \
                path.with_suffix(cap_ext).name
            cap = siblings.get(cap_name)
            text = None
            if cap is not None and cap.is_file():
                # a caption in a folder the walk reached without following links is inside the source
                if not cap.is_symlink() or is_within(cap.path, root, real_root):
                    try:
                        text = read_caption(cap.path)
                    except CaptionError as exc:
                        ctx.set_aside(Item(name=name, path=path, subset=subset, source=str(path)), str(exc))
                        continue
                else:  # a symlink out of the source: its text could be anything on this machine
                    ctx.log(f"{cap.path}: not read, it is a link to {Path(cap.path).resolve()}, outside {root}")
            yield Item(name=name, path=path, subset=subset, source=entry.path, tags=_caption_tags(text))


def _image_files(root: str, recursive: bool) -> list[tuple[str, os.DirEntry, dict[str, os.DirEntry]]]:
    """(POSIX path relative to ``root``, its directory entry, the entries of its folder by name) of
    every image file under ``root``, hidden names (``.x``) and linked folders skipped, sorted as
    paths sort. One directory listing per folder: a re-run of a large folder costs no more."""
    found = []
    folders = [("", root)]
    while folders:
        rel_dir, folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = {e.name: e for e in listing if not e.name.startswith(".")}
        except PermissionError:  # an unreadable sub-folder is skipped, as a glob skips it
            continue
        for e in entries.values():
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.is_dir(follow_symlinks=False):
                if recursive:
                    folders.append((rel, e.path))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                found.append((rel, e, entries))
    found.sort(key=lambda f: f[0].split("/"))
    return found


class KohyaSource(SourceStep):
    """Import an existing kohya sd-scripts dataset: a folder of `N_name` concept folders (N = repeats,
    with `img/`+`reg/` or `train/`+`reg/` layouts recognised), or a `dataset_config.toml`. Repeats,
    class tokens, keep tokens, reg flags, captions and masks (conditioning_data_dir, or a sibling
    `mask/N_name` folder) carry over into the manifest."""

    name = "kohya"
    summary = "Images, captions, repeats and reg folders from an existing kohya dataset."
    params = [
        Param("path", Path, help="a folder of N_name folders, or a dataset_config.toml", validate=_existing),
        Param("reg", Path, None, "a folder of N_class regularisation folders"),
    ]
    writes = frozenset({"image", "caption", "tags", "subset", "mask"})
    example = "sources:\n  - kohya: {path: old_dataset/img, reg: old_dataset/reg}"

    def inputs(self) -> list[Path]:
        paths = [self.options.path if self.options.path.is_dir() else self.options.path.parent]
        return paths + ([self.options.reg] if self.options.reg else [])

    def fingerprint(self) -> str | None:
        from lorakit.kohya import kohya_fingerprint

        return kohya_fingerprint(self.options.path, self.options.reg)

    def produce(self, ctx):
        subsets, images = read_kohya(self.options.path, self.options.reg)
        for name, sub in subsets.items():
            ctx.subsets[name] = sub
        for img in images:
            if img.caption_error:
                ctx.set_aside(Item(name=img.path.stem, path=img.path, subset=img.subset, source=str(img.path)),
                              img.caption_error)
                continue
            # kohya uses the class tokens as the caption of an image without a caption file
            text = img.caption if img.caption is not None else subsets[img.subset].class_tokens
            yield Item(name=img.path.stem, path=img.path, subset=img.subset, tags=_caption_tags(text),
                       mask=img.mask, source=str(img.path))


class DatasetSource(SourceStep):
    """Read a dataset folder that lorakit wrote (it has a manifest.json): images, captions, tag
    scores, masks, subsets and metadata carry over, so standalone commands can be chained
    (`lorakit trim raw/ a/` then `lorakit wd14 a/ b/`)."""

    name = "dataset"
    summary = "Images, tags, masks and subsets from a lorakit dataset folder (manifest.json)."
    params = [Param("path", Path, help="the dataset folder (or its manifest.json)", validate=_existing)]
    writes = frozenset({"image", "caption", "tags", "subset", "mask", "meta"})
    example = "sources:\n  - dataset: {path: cleaned/}"

    def inputs(self) -> list[Path]:
        p = self.options.path
        return [p if p.is_dir() else p.parent]

    def fingerprint(self) -> str | None:
        """The dataset folder's entries (stat only, links' targets too; hidden names such as
        .lorakit left out): the manifest, every file it may name (a loaded manifest's paths stay
        inside its folder) and the captions. The manifest is not read: at 100k images it is over
        100 MiB, and a run that is not skipped reads and checks it."""
        from lorakit.unchanged import folder_fingerprint

        p = self.options.path
        return folder_fingerprint(p if p.is_dir() else p.parent)

    def produce(self, ctx):
        from lorakit.manifest import Manifest

        manifest = Manifest.load(self.options.path)
        for name, sub in manifest.subsets.items():
            ctx.subsets[name] = sub
        for r in manifest.images:
            folder = (sub.folder or ".").strip("/") if (sub := manifest.subsets.get(r.subset)) else ""
            stem = str(Path(r.path).with_suffix(""))
            if folder not in ("", ".") and stem.startswith(folder + "/"):
                stem = stem[len(folder) + 1:]
            tags, sentence = {t["name"]: t.get("score") for t in r.tags}, r.sentence
            if r.caption_path and manifest.abspath(r.caption_path).is_file():
                try:
                    text = read_caption(manifest.abspath(r.caption_path))
                except CaptionError:
                    text = r.caption  # unreadable now: the manifest's copy of the caption stands
                if text != r.caption:  # the caption file was edited by hand: it wins (scores are lost)
                    tags, sentence = _caption_tags(text), None
            yield Item(name=stem, path=manifest.abspath(r.path), subset=r.subset,
                       caption=sentence, tags=tags,
                       mask=manifest.abspath(r.mask) if r.mask else None, meta=dict(r.meta),
                       source=r.source or str(manifest.abspath(r.path)))


@hookimpl
def register_steps(register):
    register(FolderSource)
    register(KohyaSource)
    register(DatasetSource)
