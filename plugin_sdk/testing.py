"""Test helpers for plugin authors: run a step through the real runner on a temp folder.

    from lorakit.plugin_sdk.testing import run_step, make_image

    def test_sepia_tints(tmp_path):
        make_image(tmp_path / "in" / "a.png", (64, 48), "red")
        res = run_step(Sepia, tmp_path / "in", tmp_path / "out", {"strength": 1.0})
        assert len(res.images) == 1 and not res.set_aside
        assert res.open(res.images[0]).getpixel((0, 0)) != (255, 0, 0)

The step may be a registered step name or a Step class (it need not be installed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .images import open_image
from .steps import Step


@dataclass
class StepResult:
    output_dir: Path
    manifest: Any  # lorakit.manifest.Manifest
    stats: list
    run: Any  # lorakit.runner.RunResult

    @property
    def images(self):
        return self.manifest.images

    @property
    def set_aside(self):
        return self.manifest.set_aside

    def path(self, record) -> Path:
        """Absolute path of an image record (or of any manifest-relative path string)."""
        return self.output_dir / (record if isinstance(record, str) else record.path)

    def open(self, record) -> Image.Image:
        return open_image(self.path(record))

    def by_name(self, name: str):
        """The image record whose output stem is ``name`` (e.g. ``"a"`` for ``a.png``)."""
        for r in self.manifest.images:
            if Path(r.path).with_suffix("").name == name or str(Path(r.path).with_suffix("")) == name:
                return r
        raise KeyError(f"no image named {name!r}; have {[r.path for r in self.manifest.images]}")

    def caption(self, name: str) -> str:
        return self.by_name(name).caption

    def reasons(self) -> dict[str, str]:
        """``{name: reason}`` of the images set aside."""
        return {r.name: r.reason for r in self.manifest.set_aside}


def _host_with(extra: list[type[Step]]):
    from lorakit.host import get_host, load_host

    if not extra:
        return get_host()

    class _TestPlugin:
        @staticmethod
        def register_steps(register):
            for cls in extra:
                register(cls)

    from .hookspecs import hookimpl

    _TestPlugin.register_steps = hookimpl(_TestPlugin.register_steps)
    return load_host(extra_plugins=[_TestPlugin])


def run_pipeline_dict(data: dict, base_dir: Path, extra_steps: list[type[Step]] | None = None,
                      workers: int | None = None) -> StepResult:
    """Run a pipeline given as a dict (the content of pipeline.yaml) through the real runner."""
    from rich.console import Console

    from lorakit.pipeline import parse_pipeline
    from lorakit.runner import Runner

    host = _host_with(list(extra_steps or []))
    pipeline = parse_pipeline(data, host, Path(base_dir).resolve())
    result = Runner(pipeline, console=Console(stderr=True, quiet=True), workers=workers).run()
    return StepResult(result.output_dir, result.manifest, result.stats, result)


def run_step(step: str | type[Step], input_dir: str | Path, output_dir: str | Path,
             params: dict[str, Any] | None = None, *, resolution: int = 512, workers: int | None = 1,
             subsets: dict[str, dict] | None = None, source: str = "folder") -> StepResult:
    """Run one step over ``input_dir`` (a folder of images) into ``output_dir`` and return the result.

    ``workers=1`` keeps everything in this process (fast, debuggable); pass None to use all cores.
    """
    extra = [] if isinstance(step, str) else [step]
    name = step if isinstance(step, str) else step.name
    data = {
        "output": str(output_dir), "resolution": resolution,
        "sources": [{source: {"path": str(input_dir)}}],
        "steps": [{name: dict(params or {})}],
    }
    if subsets:
        data["subsets"] = subsets
    return run_pipeline_dict(data, Path.cwd(), extra, workers=workers)


def make_image(path: str | Path, size: tuple[int, int] = (64, 64), color: Any = "white", mode: str = "RGB") -> Path:
    """Write a solid-colour test image (format from the extension) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def assert_valid_manifest(dataset: str | Path) -> Any:
    """Check a dataset folder the way the trainer will rely on it, and return its Manifest.

    The manifest matches the published JSON Schema; every image, caption and mask it names exists;
    each image's sha256, size and caption file agree with the manifest; subsets are declared.
    """
    import hashlib
    import json

    import jsonschema

    from lorakit.manifest import MANIFEST_NAME, MANIFEST_SCHEMA, Manifest

    dataset = Path(dataset)
    data = json.loads((dataset / MANIFEST_NAME).read_text(encoding="utf-8"))
    jsonschema.validate(data, MANIFEST_SCHEMA)
    manifest = Manifest.load(dataset)
    for r in manifest.images:
        image = manifest.abspath(r.path)
        assert image.is_file(), f"{r.path}: listed in the manifest but missing"
        assert hashlib.sha256(image.read_bytes()).hexdigest() == r.sha256, f"{r.path}: sha256 differs from the manifest"
        with Image.open(image) as im:
            assert im.size == (r.width, r.height), f"{r.path}: size {im.size} != manifest {(r.width, r.height)}"
        if r.caption_path:
            text = manifest.abspath(r.caption_path).read_text(encoding="utf-8")
            assert text == r.caption, f"{r.caption_path}: caption file differs from the manifest"
        if r.mask:
            assert manifest.abspath(r.mask).is_file(), f"{r.mask}: mask listed but missing"
        assert r.subset in manifest.subsets, f"{r.path}: subset {r.subset!r} is not declared"
        assert r.repeats == manifest.subsets[r.subset].repeats and r.is_reg == manifest.subsets[r.subset].is_reg
    return manifest
