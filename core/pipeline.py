"""``pipeline.yaml``: loading, validation (before any work starts) and the exported JSON Schema.

    output: dataset/            # where the dataset folder is written (required)
    resolution: 512             # training resolution: 512 for SD1.5, 1024 for SDXL
    sources:                    # where images come from (at least one)
      - folder: {path: raw/outfit1, subset: outfit1}
      - kohya: {path: old_dataset/}
    subsets:                    # concept folders: repeats, triggers, keep tokens, reg flag
      outfit1: {repeats: 3, triggers: [mychar], keep_tokens: 1}
    steps:                      # applied in order; a bare name uses the defaults
      - convert
      - trim: {fuzz: 20%}
    train: {...}                # optional: the trainer's settings (see `lorakit train --help`)

Every entry of ``sources`` and ``steps`` is a step name, or a one-key mapping from the step name to
its parameters. ``subset`` in a source's mapping puts all its images in that subset.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.plugin_sdk import LorakitError, ManyErrors, ModelRef, PathEscape, SourceStep, Step, Subset, check_relative
from lorakit.plugin_sdk.subset import SUBSET_FIELDS

from .host import Host

TOP_LEVEL_KEYS = {"output", "resolution", "workers", "executor", "sources", "subsets", "steps", "train", "cache_dir"}


@dataclass
class ConfiguredStep:
    step: Step
    where: str
    subset: str | None = None  # sources only: put every image in this subset


@dataclass
class Pipeline:
    path: Path | None
    output: Path
    sources: list[ConfiguredStep]
    steps: list[ConfiguredStep]
    subsets: dict[str, dict[str, Any]] = field(default_factory=dict)
    resolution: int = 512
    workers: int | None = None
    executor: str | None = None  # where per-image work runs: local (default) or ray (executors.py)
    train: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None

    def subset_objects(self) -> dict[str, Subset]:
        return {name: Subset.from_dict({"name": name, **cfg}) for name, cfg in self.subsets.items()}


class _Lines:
    """Line numbers of the YAML nodes, so errors can say where in the file a mistake is."""

    def __init__(self, node, filename: str):
        self.filename = filename
        self.lines: dict[tuple, int] = {}
        self._walk(node, ())

    def _walk(self, node, path):
        if node is None:
            return
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = key.value
                self.lines[path + (k,)] = key.start_mark.line + 1
                self._walk(value, path + (k,))
                self.lines[path + (k,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                self._walk(value, path + (i,))

    def at(self, *path) -> str:
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return f"{self.filename}:{self.lines[path[:n]]}"
        return self.filename


def read_yaml(path: Path) -> tuple[Any, _Lines]:
    if not path.is_file():
        raise LorakitError(f"{path}: pipeline file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise LorakitError(f"{path}{line}: malformed YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise LorakitError(f"{path}: malformed YAML: {exc}") from None
    return data, _Lines(node, str(path))


def _entry(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``{name: {params}}`` -> (name, params)."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        (name, params), = entry.items()
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise LorakitError(f"{where}: the parameters of '{name}' must be a mapping (key: value), not {params!r}")
        return str(name), dict(params)
    raise LorakitError(f"{where}: expected a step name or a one-key mapping 'name: {{params}}', got {entry!r}")


def _resolve_paths(step_cls: type[Step], params: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative Path parameters are relative to the pipeline file's folder."""
    out = dict(params)
    for p in step_cls.params:
        value = out.get(p.name)
        if not isinstance(value, str) or os.path.isabs(os.path.expanduser(value)):
            continue
        if p.type is Path or (p.type is ModelRef and (base / value).exists()):
            out[p.name] = str(base / value)  # a ModelRef that is no local path stays a hub id
    return out


def parse_pipeline(data: Any, host: Host, base: Path, lines: _Lines | None = None, path: Path | None = None) -> Pipeline:
    """Validate a pipeline mapping completely: every step known, every parameter valid.

    Independent mistakes (each source, step and subset, the top-level settings) are all collected
    and reported together, so one `lorakit validate` shows everything there is to fix.
    """
    lines = lines or _Lines(None, str(path or "pipeline"))
    if not isinstance(data, dict):
        raise LorakitError(f"{lines.at()}: a pipeline is a mapping with output, sources and steps")
    errors: list[LorakitError] = []

    def check(fn, *args):
        try:
            return fn(*args)
        except LorakitError as exc:
            errors.append(exc)
            return None

    for key in sorted(set(data) - TOP_LEVEL_KEYS):
        close = difflib.get_close_matches(key, sorted(TOP_LEVEL_KEYS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        errors.append(LorakitError(f"{lines.at(key)}: unknown key '{key}' ({hint}known: {', '.join(sorted(TOP_LEVEL_KEYS))})"))
    output = None
    if not data.get("output"):
        errors.append(LorakitError(f"{lines.at()}: 'output' is required (the folder the dataset is written to)"))
    else:
        output = Path(os.path.expanduser(str(data["output"])))
        if not output.is_absolute():
            output = base / output
        check(refuse_unsafe_output, output, lines.at("output"))
    resolution = data.get("resolution", 512)
    if not isinstance(resolution, int) or isinstance(resolution, bool) or not 64 <= resolution <= 4096 or resolution % 8:
        errors.append(LorakitError(f"{lines.at('resolution')}: resolution must be a multiple of 8 between 64 and 4096, "
                                   f"not {resolution!r}"))
        resolution = 512
    workers = data.get("workers")
    if workers in (None, "auto"):
        workers = None
    elif not isinstance(workers, int) or workers < 1:
        errors.append(LorakitError(f"{lines.at('workers')}: workers must be a positive integer or auto, not {workers!r}"))
        workers = None
    executor = data.get("executor")
    if executor is not None and executor not in ("local", "ray"):
        errors.append(LorakitError(f"{lines.at('executor')}: executor must be local or ray, not {executor!r}"))
        executor = None

    def source(i, entry):
        where = lines.at("sources", i)
        name, params = _entry(entry, where)
        cls = _known(host, name, where)
        if cls.kind != "source":
            raise LorakitError(f"{where}: '{name}' is a {cls.kind} step, not a source; put it under 'steps'")
        subset = params.pop("subset", None)
        if subset is not None:
            _check_subset_name(str(subset), where)
        params = _resolve_paths(cls, params, base)
        step = cls.configure(params, where=where)
        _check_model_paths(cls, step, where)
        return ConfiguredStep(step, where, str(subset) if subset is not None else None)

    sources_raw = data.get("sources")
    sources = []
    if not sources_raw or not isinstance(sources_raw, list):
        errors.append(LorakitError(f"{lines.at('sources')}: 'sources' must be a non-empty list "
                                   "(e.g. - folder: {path: images/})"))
    else:
        sources = [c for c in (check(source, i, e) for i, e in enumerate(sources_raw)) if c is not None]

    def step_entry(i, entry):
        where = lines.at("steps", i)
        name, params = _entry(entry, where)
        cls = _known(host, name, where)
        if cls.kind == "source":
            raise LorakitError(f"{where}: '{name}' is a source; put it under 'sources'")
        step = cls.configure(_resolve_paths(cls, params, base), where=where)
        _check_model_paths(cls, step, where)
        return ConfiguredStep(step, where)

    steps_raw = data.get("steps") or []
    steps = []
    if not isinstance(steps_raw, list):
        errors.append(LorakitError(f"{lines.at('steps')}: 'steps' must be a list"))
    else:
        steps = [c for c in (check(step_entry, i, e) for i, e in enumerate(steps_raw)) if c is not None]

    def subset_entry(name, cfg):
        cfg = cfg or {}
        where = lines.at("subsets", name)
        if not isinstance(cfg, dict):
            raise LorakitError(f"{where}: settings of subset '{name}' must be a mapping")
        bad = set(cfg) - (set(SUBSET_FIELDS) - {"name"})
        if bad:
            known = [f for f in SUBSET_FIELDS if f != "name"]
            close = difflib.get_close_matches(sorted(bad)[0], known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise LorakitError(f"{where}: subset '{name}': unknown setting '{sorted(bad)[0]}' ({hint}known: {', '.join(known)})")
        _check_subset_name(str(name), where)
        _check_subset(str(name), cfg, where)
        return dict(cfg)

    subsets_raw = data.get("subsets") or {}
    subsets = {}
    if not isinstance(subsets_raw, dict):
        errors.append(LorakitError(f"{lines.at('subsets')}: 'subsets' must be a mapping of subset name to settings"))
    else:
        for name, cfg in subsets_raw.items():
            checked = check(subset_entry, name, cfg)
            if checked is not None:
                subsets[str(name)] = checked

    train = data.get("train")
    if train is not None and not isinstance(train, dict):
        errors.append(LorakitError(f"{lines.at('train')}: 'train' must be a mapping of trainer settings"))
    if errors:
        raise errors[0] if len(errors) == 1 else ManyErrors(errors, f"{lines.filename}: {{n}} problems")
    cache_dir = data.get("cache_dir")
    pipeline = Pipeline(path=path, output=output, sources=sources, steps=steps, subsets=subsets,
                        resolution=resolution, workers=workers, executor=executor, train=train, raw=data,
                        cache_dir=(base / cache_dir) if cache_dir else None)
    _check_folders(pipeline)
    return pipeline


_MODEL_SUFFIXES = {".safetensors", ".onnx", ".pth", ".pt", ".ckpt", ".bin", ".csv", ".json"}


def _check_model_paths(cls: type[Step], step: Step, where: str) -> None:
    """A model parameter that is clearly a local path (not a hub id) must exist before any work."""
    for p in cls.params:
        if p.type is not ModelRef or step.options[p.name] is None:
            continue
        value = step.options[p.name]
        text = str(value)
        explicit = Path(text).is_absolute() or text.startswith((".", "~"))
        hub_file = re.fullmatch(r"[\w.-]+/[\w.-]+:.+", text)  # owner/name:path/in/repo
        local = explicit or (not hub_file and (Path(text).suffix.lower() in _MODEL_SUFFIXES or text.count("/") > 1))
        if local and not Path(os.path.expanduser(text)).exists():
            raise LorakitError(f"{where}: step '{cls.name}': {p.name} = {text!r}: no such file or folder "
                               "(a local model path must exist; a hub id is written owner/name)")


def _check_subset_name(name: str, where: str) -> None:
    """A subset's name is its default folder inside the output: it must stay inside."""
    try:
        check_relative(name, "subset name")
    except PathEscape as exc:
        raise PathEscape(f"{where}: {exc}") from None


def _check_subset(name: str, cfg: dict[str, Any], where: str) -> None:
    def bad(key, expected):
        raise LorakitError(f"{where}: subset '{name}': {key} = {cfg[key]!r} is invalid: expected {expected}")

    if "folder" in cfg and cfg["folder"] is not None:
        if not isinstance(cfg["folder"], str):
            bad("folder", "a folder name inside the output")
        try:
            check_relative(cfg["folder"], f"subset '{name}': folder")
        except PathEscape as exc:
            raise PathEscape(f"{where}: {exc}") from None

    if "repeats" in cfg and (not isinstance(cfg["repeats"], int) or isinstance(cfg["repeats"], bool) or cfg["repeats"] < 1):
        bad("repeats", "a positive integer")
    if "keep_tokens" in cfg and (not isinstance(cfg["keep_tokens"], int) or cfg["keep_tokens"] < 0):
        bad("keep_tokens", "a non-negative integer")
    if "triggers" in cfg:
        if isinstance(cfg["triggers"], str):
            cfg["triggers"] = [cfg["triggers"]]
        if not isinstance(cfg["triggers"], list) or not all(isinstance(t, str) for t in cfg["triggers"]):
            bad("triggers", "a list of strings")
    for key in ("is_reg", "shuffle_caption", "flip_aug"):
        if key in cfg and not isinstance(cfg[key], bool):
            bad(key, "true or false")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if key in cfg and (not isinstance(cfg[key], (int, float)) or not 0 <= cfg[key] <= 1):
            bad(key, "a number from 0 to 1")


def _known(host: Host, name: str, where: str) -> type[Step]:
    if name not in host.steps:
        close = difflib.get_close_matches(name, sorted(host.steps), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise LorakitError(f"{where}: unknown step '{name}'. {hint}Installed steps: {', '.join(sorted(host.steps))}")
    return host.steps[name]


# Folders that are never a dataset output: the run owns what it writes there and cleans up after itself.
_SYSTEM_FOLDERS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt",
                   "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/local", "/var", "/Users",
                   "/Applications", "/Library", "/System", "/Volumes", "/private", "/private/tmp", "/private/var")


def refuse_unsafe_output(output: Path, where: str) -> None:
    """Refuse an output that is ``/``, a system folder, a home folder (or holds one)."""
    out = Path(output).expanduser().resolve()
    home = Path.home().resolve()
    system = {Path(p) for p in _SYSTEM_FOLDERS}
    system |= {Path(p).resolve() for p in _SYSTEM_FOLDERS if Path(p).exists()}
    if os.name == "nt":
        system |= {Path(os.environ.get(k, "")).resolve() for k in ("SystemRoot", "ProgramFiles", "ProgramFiles(x86)",
                                                                  "ProgramData", "USERPROFILE") if os.environ.get(k)}
    why = None
    if out == Path(out.anchor):
        why = "the root of a drive"
    elif out in system:
        why = "a system folder"
    elif out == home or out in home.parents:
        why = "your home folder" if out == home else f"a folder that holds your home folder ({home})"
    elif out.parent in {Path("/home"), Path("/Users")}:
        why = "a home folder"
    if why:
        raise LorakitError(f"{where}: the output {out} is {why}. lorakit writes and deletes files in its output: "
                           "choose a folder of its own, e.g. dataset/")


def _check_folders(pipeline: Pipeline) -> None:
    """Refuse an output folder that is, contains or sits inside a source folder: sources are never written;
    refuse a home or system folder as the output, and a cache inside a source."""
    out = pipeline.output.resolve()
    cache = pipeline.cache_dir.resolve() if pipeline.cache_dir else None
    for src in pipeline.sources:
        if not isinstance(src.step, SourceStep):
            continue
        for folder in src.step.inputs():
            folder = Path(folder).resolve()
            if out == folder or folder in out.parents or out in folder.parents:
                raise LorakitError(
                    f"{src.where}: the output folder {out} overlaps the source folder {folder}; "
                    "choose an output outside the sources (source images are never written to)"
                )
            if cache is not None and (cache == folder or folder in cache.parents):
                raise LorakitError(
                    f"{src.where}: cache_dir {cache} is inside the source folder {folder}; "
                    "choose a cache folder outside the sources (source folders are never written to)"
                )


def load_pipeline(path: str | Path, host: Host, output: str | Path | None = None) -> Pipeline:
    """Read and validate ``path``; ``output`` (from the command line) replaces the file's output folder."""
    path = Path(path)
    data, lines = read_yaml(path)
    if output is not None and isinstance(data, dict):
        data = {**data, "output": str(Path(os.path.expanduser(str(output))).resolve())}
    return parse_pipeline(data, host, path.parent.resolve(), lines, path)


def pipeline_schema(host: Host) -> dict[str, Any]:
    """The JSON Schema of pipeline.yaml for the installed steps (for editor completion)."""

    def entry_schema(kind_filter):
        variants = []
        names = []
        for name, cls in sorted(host.steps.items()):
            if not kind_filter(cls):
                continue
            props = {p.name: p.to_json_schema() for p in cls.params if not p.cli_only}
            if cls.kind == "source":
                props["subset"] = {"type": "string", "description": "put every image of this source in this subset"}
            required = [p.name for p in cls.params if p.required and not p.cli_only]
            body = {"type": ["object", "null"], "properties": props, "additionalProperties": False}
            if required:
                body = {"type": "object", "properties": props, "additionalProperties": False, "required": required}
            variants.append({
                "type": "object", "description": cls.summary,
                "properties": {name: body}, "required": [name], "additionalProperties": False,
            })
            if not required:
                names.append(name)
        if names:
            variants.append({"enum": names})
        return {"anyOf": variants}

    subset_props = {
        "folder": {"type": "string", "description": "folder of this subset inside the output"},
        "repeats": {"type": "integer", "minimum": 1, "description": "kohya num_repeats (the N of N_name)"},
        "triggers": {"type": "array", "items": {"type": "string"}, "description": "trigger tags prepended to captions"},
        "class_tokens": {"type": "string", "description": "class word, e.g. 1girl (DreamBooth)"},
        "keep_tokens": {"type": "integer", "minimum": 0, "description": "leading tags caption shuffle keeps in place"},
        "keep_tokens_separator": {"type": "string", "description": "e.g. '|||': tags before it are kept in place"},
        "is_reg": {"type": "boolean", "description": "regularisation images"},
        "shuffle_caption": {"type": "boolean"},
        "caption_dropout_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "caption_tag_dropout_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "flip_aug": {"type": "boolean"},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lorakit pipeline",
        "type": "object",
        "required": ["output", "sources"],
        "additionalProperties": False,
        "properties": {
            "output": {"type": "string", "description": "dataset folder to write"},
            "resolution": {"type": "integer", "default": 512, "description": "training resolution (512 SD1.5, 1024 SDXL)"},
            "workers": {"type": ["integer", "string"], "default": "auto", "description": "processes for per-image steps"},
            "executor": {"type": "string", "enum": ["local", "ray"], "default": "local",
                         "description": "where per-image steps run: this machine's processes, or a Ray cluster"},
            "cache_dir": {"type": "string", "description": "where results are cached (default OUTPUT/.lorakit)"},
            "sources": {"type": "array", "minItems": 1, "items": entry_schema(lambda c: c.kind == "source")},
            "steps": {"type": "array", "items": entry_schema(lambda c: c.kind != "source")},
            "subsets": {"type": "object", "additionalProperties": {"type": ["object", "null"], "properties": subset_props, "additionalProperties": False}},
            "train": {"type": "object", "description": "trainer settings: see `lorakit train --show-config`"},
        },
    }
