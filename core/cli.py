"""The ``lorakit`` command: run/validate pipelines, list plugins and steps, export datasets, and one
generated command per step (``lorakit <step> INPUT_DIR OUTPUT_DIR [--option value ...]``)."""
from __future__ import annotations

import difflib
import json
import sqlite3
import sys
import textwrap
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lorakit import __version__
from lorakit.plugin_sdk import LorakitError, Step, storage_error_message

from .helptext import click_help, print_plain
from .host import Host, get_host, warn_failed

console = Console(stderr=True)
out_console = Console()


def _fail(message: str, code: int = 1):
    # soft_wrap: the terminal wraps the line itself, so paths and URLs copy whole
    console.print(f"[bold red]Error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    sys.exit(code)


class StepGroup(click.Group):
    """A click group whose extra commands come from the installed steps (built lazily)."""

    def _host(self) -> Host:
        host = get_host()
        if not getattr(self, "_extra_loaded", False):
            self._extra_loaded = True
            warn_failed(host, sys.stderr)
            host.pm.hook.register_commands(cli=self)
        return host

    def list_commands(self, ctx):
        host = self._host()
        return sorted(set(super().list_commands(ctx)) | set(host.steps))

    def get_command(self, ctx, name):
        host = self._host()
        cmd = super().get_command(ctx, name)
        if cmd is None and name in host.steps:
            return step_command(host.steps[name])
        return cmd

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LorakitError as exc:
            _fail(str(exc))
        except (OSError, sqlite3.Error) as exc:  # a full disk, a read-only or non-writable folder: a sentence
            message = storage_error_message(exc)
            if message is None:
                raise
            _fail(message)
        except KeyboardInterrupt:
            console.print("\n[yellow]Interrupted.[/] Finished results are cached: run the same command again to resume.")
            sys.exit(130)


@click.group(cls=StepGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lorakit")
def cli():
    """lorakit: from a folder of pictures (or a booru search) to a trained LoRA.

    \b
    Quick start:
      lorakit steps                     what each step does, with its options
      lorakit run pipeline.yaml         run a whole pipeline into a dataset folder
      lorakit trim raw/ trimmed/ --fuzz 20%     any step on its own
      lorakit train dataset/ --base-model model.safetensors --output my_lora.safetensors

    Results are cached by content: re-running redoes only what changed.
    """


# ----- running pipelines ------------------------------------------------------------------------
def _load(path: str, output: str | None = None):
    from .pipeline import load_pipeline

    host = get_host()
    pipeline = load_pipeline(Path(path), host, output)
    train_config = None
    if pipeline.train is not None:
        from lorakit.trainer.config import check_model_paths, validate_settings  # no torch import just to check

        train_config = validate_settings(pipeline.train, f"{path}: train", base_dir=Path(path).resolve().parent)
        check_model_paths(train_config, f"{path}: train")  # a missing local base model fails before any work
    return pipeline, train_config


@cli.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--workers", type=click.IntRange(1), default=None, help="processes for per-image steps [default: all cores]")
@click.option("--no-train", is_flag=True, help="prepare the dataset but skip the pipeline's train: section")
@click.option("--force", is_flag=True, help="overwrite files in the output that lorakit did not write; "
              "retrain even when the dataset and train: settings are unchanged")
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="write the dataset here instead of the pipeline's output: folder")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="where per-image steps run: this machine's processes, or a Ray cluster (pip install "
              "'lorakit[ray]') [default: the pipeline's executor:, else local]")
@click.option("--ray-address", metavar="ADDR", default=None,
              help="the Ray cluster to use (host:port, or auto for the one `ray start` made here) "
              "[default: $RAY_ADDRESS, else a Ray instance of this machine's own]")
def run(pipeline_file, workers, no_train, force, output, executor, ray_address):
    """Run PIPELINE_FILE (pipeline.yaml): sources -> steps -> dataset folder with manifest.json.

    Everything is validated before any work starts. Unchanged work is taken from the cache, an
    interrupted run resumes, and images a step cannot handle are set aside with the reason.
    """
    from .runner import Runner

    pipeline, train_config = _load(pipeline_file, output)
    if ray_address and (executor or pipeline.executor) != "ray":
        raise LorakitError("--ray-address is for the ray executor: add --executor ray (or executor: ray in the pipeline)")
    result = Runner(pipeline, console=console, workers=workers, force=force, executor=executor,
                    ray_address=ray_address).run()
    print_summary(result)
    _fail_if_crashed(result)
    if train_config is not None and not no_train:
        from lorakit.trainer.api import train

        train(result.output_dir, train_config, console=console, force=force)  # unchanged: not trained again


@cli.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="check this output folder instead of the pipeline's output:")
def validate(pipeline_file, output):
    """Check PIPELINE_FILE without running it: YAML, step names, every parameter, folders."""
    pipeline, train_config = _load(pipeline_file, output)
    out_console.print(f"[green]OK[/] {pipeline_file}: {len(pipeline.sources)} source(s), {len(pipeline.steps)} step(s)"
                      + (", training configured" if train_config is not None else "")
                      + f"; output -> {pipeline.output}")


def _fail_if_crashed(result) -> None:
    """Images that killed a worker process make the run a failure, even though the dataset was written."""
    if result.crashed:
        names = ", ".join(result.crashed[:5]) + (f" and {len(result.crashed) - 5} more" if len(result.crashed) > 5 else "")
        _fail(f"{len(result.crashed)} image(s) killed a worker process and were set aside: {names}. The dataset "
              "was written without them; run again to retry them.")


@cli.command()
@click.argument("target", type=click.Path(exists=True))
@click.option("--dry-run", is_flag=True, help="only show what would be removed and its size")
def clean(target, dry_run):
    """Remove cached results and stored files that no finished run uses any more.

    TARGET is a pipeline file, a dataset folder (its .lorakit store) or a store folder. What the
    last finished run of each output folder used is kept, so the next run is still all cache
    hits; results of older settings (another trim fuzz, a removed step) go.
    """
    from .store import DB_NAME, Store, clean_store

    path = Path(target)
    if path.is_file():
        from .runner import STORE_DIR

        pipeline, _ = _load(target)
        root = pipeline.cache_dir or pipeline.output / STORE_DIR
    elif (path / DB_NAME).is_file():
        root = path
    else:
        from .runner import STORE_DIR

        root = path / STORE_DIR
    if not (root / DB_NAME).is_file():
        raise LorakitError(f"{root}: no lorakit store here (run a pipeline first; older stores need one run "
                           "with this version before they can be cleaned)")
    store = Store(root)
    try:
        report = clean_store(store, dry_run=dry_run)
    finally:
        store.close()
    verb = "Would remove" if dry_run else "Removed"
    out_console.print(f"{verb} {report.entries} cache entries, {report.blobs} stored image(s) and {report.files} "
                      f"other file(s): {_size(report.bytes)}. Kept {report.kept_entries} entries and "
                      f"{report.kept_blobs} image(s) ({_size(report.kept_bytes)}) used by {len(report.runs)} "
                      f"run(s) -> {root}", highlight=False)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summary(result) -> None:
    table = Table(title="lorakit run", show_lines=False)
    for col in ("step", "kind", "in", "out", "set aside", "cached", "seconds"):
        table.add_column(col, justify="right" if col not in ("step", "kind") else "left")
    for s in result.stats:
        table.add_row(s.name, s.kind, str(s.inputs), str(s.outputs), str(s.set_aside) if s.set_aside else "",
                      f"{s.cached}/{s.inputs}" if s.inputs else "", f"{s.seconds:.1f}")
    console.print(table)
    for s in result.stats:
        for m in s.messages[:12]:
            console.print(Text.assemble(("  " + s.name, "cyan"), ": " + m), highlight=False)
        if len(s.messages) > 12:
            console.print(Text.assemble(("  " + s.name, "cyan"), f": ... and {len(s.messages) - 12} more lines"))
    if result.set_aside:
        print_set_aside(result)
    _warn_empty_subsets(result)
    _print_image_warnings(result)
    summary = result.summary()
    n, subsets = summary["images"], summary["subsets"]
    console.print(Text.assemble((f"{n} image(s)", "green"), f" in {len(subsets)} subset(s) -> {result.output_dir}  "
                                f"(manifest: {result.manifest_path})"), soft_wrap=True)
    if result.unchanged_run:
        console.print("Nothing changed since the last run (sources, steps, curation and outputs as it left them): "
                      "nothing was done or written.")
    elif result.nothing_changed:
        console.print("Nothing changed since the last run: every result came from the cache.")


def _print_image_warnings(result, names_shown: int = 3) -> None:
    """Images kept but flagged by a step (``meta.warnings``): a trim that cut most of the picture..."""
    groups: dict[str, list[str]] = result.summary()["warnings"]
    if not groups:
        return
    total = sum(len(v) for v in groups.values())
    console.print(Text.assemble((f"{total} warning(s)", "yellow"), " on images kept in the dataset "
                                "(meta.warnings in the manifest; `lorakit review` shows them):"), soft_wrap=True)
    for step, names in sorted(groups.items()):
        more = f" and {len(names) - names_shown} more" if len(names) > names_shown else ""
        console.print(Text.assemble("  ", (step, "cyan"), f": {', '.join(names[:names_shown])}{more}"), highlight=False)


def _warn_empty_subsets(result) -> None:
    """A subset configured in pipeline.yaml that no image reached is most often a typo of a real one."""
    configured = result.summary()["configured_subsets"]
    used = sorted(result.summary()["subsets"])
    for name in configured:
        if str(name) in used:
            continue
        close = difflib.get_close_matches(str(name), used, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        console.print(Text.assemble(("Warning:", "yellow"), f" subsets: '{name}' has no images (the images are in "
                                    f"{', '.join(used) or 'no subset'}); its settings were not used.{hint}"),
                      soft_wrap=True)


def print_set_aside(result, reasons_shown: int = 15, names_shown: int = 3) -> None:
    """What was set aside, grouped by step and reason, naming the first few images of each group."""
    records = result.set_aside
    copies = sum(1 for r in records if r.path)
    where = f"copies of {copies} in {result.output_dir / 'set_aside'}" if copies else "no copies: the files could not be read"
    if copies and copies < len(records):
        where += f"; {len(records) - copies} unreadable file(s) have none"
    console.print(Text.assemble((f"{len(records)} image(s) set aside", "yellow"), f" ({where}):"), soft_wrap=True)
    groups: dict[tuple[str, str], list] = {}
    for r in records:  # a reason that starts with its file's path is grouped without it (the names follow)
        reason = r.reason[len(r.source) + 2:] if r.source and r.reason.startswith(r.source + ": ") else r.reason
        groups.setdefault((r.step, reason), []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    for (step, reason), members in ordered[:reasons_shown]:
        names = ", ".join(Path(m.source).name if m.source else m.name for m in members[:names_shown])
        more = f" and {len(members) - names_shown} more" if len(members) > names_shown else ""
        console.print(Text.assemble(f"  {len(members)} x ", (step, "cyan"), f": {reason}  ({names}{more})"),
                      highlight=False)
    if len(ordered) > reasons_shown:
        console.print(f"  ... and {len(ordered) - reasons_shown} more reasons: every image is in the set_aside "
                      f"list of {result.manifest_path}", highlight=False)
    elif any(len(m) > names_shown for _, m in ordered):
        console.print(f"  every image is in the set_aside list of {result.manifest_path}", highlight=False)


# ----- plugins and steps ------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def plugins(as_json):
    """List installed plugins, the steps and hooks each provides, and any that failed to load.

    LORAKIT_LOAD_PLUGINS limits third-party plugins (empty: built-ins only; 'a,b': only a and b).
    """
    host = get_host()
    data = [{"name": p.name, "distribution": p.distribution, "version": p.version, "module": p.module,
             "builtin": p.builtin, "steps": p.steps, "hooks": p.hooks, "error": p.error} for p in host.plugins]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table(title="lorakit plugins")
    for col in ("plugin", "distribution", "version", "steps", "hooks", "status"):
        table.add_column(col)
    for p in data:
        table.add_row(p["name"], p["distribution"], p["version"], ", ".join(p["steps"]), ", ".join(p["hooks"]),
                      "[red]failed: " + escape(p["error"]) + "[/]" if p["error"] else "[green]ok[/]")
    out_console.print(table)


def _step_info(cls: type[Step]) -> dict:
    return {"name": cls.name, "kind": cls.kind, "summary": cls.summary, "version": cls.version,
            "reads": None if cls.reads is None else sorted(cls.reads),
            "writes": None if cls.writes is None else sorted(cls.writes), "description": cls.describe(),
            "example": cls.example,
            "params": [{"name": p.name, "type": p.expected, "default": None if p.required else p.to_json_schema().get("default"),
                        "required": p.required, "help": p.help} for p in cls.params]}


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def steps(name, as_json):
    """List every installed step with its summary and parameters (or one step in detail)."""
    host = get_host()
    classes = [host.step(name)] if name else [host.steps[n] for n in sorted(host.steps)]
    if as_json:
        click.echo(json.dumps([_step_info(c) for c in classes], indent=2))
        return
    for cls in classes:
        header = Text.assemble((cls.name, "bold cyan"), (f"  {cls.kind} step", "dim"))
        out_console.print(header)
        print_plain(out_console, cls.describe() if name else cls.summary, indent=2)
        if cls.params:
            out_console.print()
        for p in cls.params:
            flag = "  --" + p.name.replace("_", "-")
            line = Text(textwrap.fill(f"{flag}  {p.default_text()}", width=out_console.width - 1,
                                      subsequent_indent=" " * 6, break_long_words=False, break_on_hyphens=False),
                        style="dim")
            line.stylize("green", 0, len(flag))
            out_console.print(line, soft_wrap=True, highlight=False)
            print_plain(out_console, f"{p.help} ({p.expected})" if p.help else f"({p.expected})", indent=6)
        if name and cls.example:
            out_console.print("\nExample:")
            out_console.print(Text(cls.example), soft_wrap=True)  # one line: copy-pasteable
        out_console.print()


@cli.command()
def schema():
    """Print the JSON Schema of pipeline.yaml for the installed steps (for editor completion)."""
    from .pipeline import pipeline_schema

    click.echo(json.dumps(pipeline_schema(get_host()), indent=2))


@cli.command("export")
@click.argument("format", type=click.Choice(["kohya", "diffusers"]))
@click.argument("dataset", type=click.Path(exists=True))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--repeat-lines", is_flag=True, help="diffusers: write each image's line 'repeats' times")
@click.option("--relative-paths", is_flag=True,
              help="kohya: image_dir relative to the config's folder (default: absolute)")
@click.option("--force", is_flag=True,
              help="write into a non-empty folder that is not a lorakit export (same names are overwritten)")
@click.option("--bucket-no-upscale", is_flag=True,
              help="kohya: buckets from each image's own size, never upscaled")
@click.option("--random-crop", is_flag=True,
              help="kohya: random crops (kohya then refuses --cache_latents)")
def export(format, dataset, output, repeat_lines, relative_paths, force, bucket_no_upscale, random_crop):
    """Export DATASET (a lorakit dataset folder) to OUTPUT in another trainer's layout.

    \b
    kohya:     img/N_name/*.png + .txt, reg/N_name/, mask/N_name/, dataset_config.toml
    diffusers: images + metadata.jsonl (file_name, text)

    OUTPUT must be new, empty, or an earlier export (it keeps a ledger,
    .lorakit-export.json): files the earlier export wrote and this one does
    not are deleted, unless changed since.
    """
    from .export import export_diffusers
    from .kohya import export_kohya_report
    from .manifest import load_dataset

    manifest = load_dataset(Path(dataset))
    report = None
    if format == "kohya":
        report = export_kohya_report(manifest, Path(output), relative_paths=relative_paths, force=force,
                                     bucket_no_upscale=bucket_no_upscale, random_crop=random_crop)
        target = report.config
    else:
        target = export_diffusers(manifest, Path(output), repeat_lines=repeat_lines, force=force)
    exported = len(manifest.images)
    note = ""
    if format == "diffusers":
        reg = sum(1 for r in manifest.images if r.is_reg)
        exported -= reg
        if reg:
            note = f" ({reg} regularisation image(s) left out: diffusers' scripts take them as a class folder)"
    console.print(Text.assemble(("Exported", "green"), f" {exported} image(s) -> {target}{note}"), soft_wrap=True)
    if report is not None:
        console.print(Text(f"Train with: {report.command(sdxl=(manifest.resolution or 512) >= 1024)}"), soft_wrap=True)
        for item in report.lost:
            console.print(Text(f"Not kept by kohya: {item}", style="yellow"), soft_wrap=True)
        for item in report.kept:
            console.print(Text(f"Kept {item}: no longer exported, but changed since the last export wrote it",
                               style="yellow"), soft_wrap=True)


from .review.command import review as _review  # noqa: E402  (the review page: core/review/)

cli.add_command(_review)


from .curate_cli import curate  # noqa: E402  (the command group lives in its own module)

cli.add_command(curate)


# ----- one command per step ---------------------------------------------------------------------
def step_command(cls: type[Step]) -> click.Command:
    """``lorakit <step> INPUT_DIR OUTPUT_DIR [--param value ...]`` built from the step's declared params."""
    positional_path = cls.kind == "source" and cls.params and cls.params[0].name == "path" and cls.params[0].required
    params: list[click.Parameter] = []
    if cls.kind != "source":
        params.append(click.Argument(["input_dir"], type=click.Path(exists=True, file_okay=False)))
    elif positional_path:
        params.append(click.Argument(["input_path"], type=click.Path(exists=True)))
    params.append(click.Argument(["output_dir"], type=click.Path(file_okay=False)))
    for p in cls.params:
        if positional_path and p.name == "path":
            continue
        flag = "--" + p.name.replace("_", "-")
        help_text = f"{p.help}  [{p.expected}; default: {p.default_text()}]"
        if p.type is bool:
            params.append(click.Option([f"{flag}/--no-{p.name.replace('_', '-')}"], default=None, help=help_text))
        else:
            params.append(click.Option([flag, p.name], default=None, help=help_text, metavar="VALUE"))
    if cls.kind != "source":
        params.append(click.Option(["--workers"], type=click.IntRange(1), default=None, help="processes [default: all cores]"))
    params.append(click.Option(["--resolution"], type=int, default=512, show_default=True,
                               help="training resolution the step may use (512 SD1.5, 1024 SDXL)"))
    params.append(click.Option(["--force"], is_flag=True, help="overwrite files in OUTPUT_DIR that lorakit did not write"))

    def callback(output_dir, input_dir=None, input_path=None, workers=None, resolution=512, force=False, **values):
        from .pipeline import _Lines, parse_pipeline
        from .runner import Runner

        host = get_host()
        given = {k: v for k, v in values.items() if v is not None}
        if input_path is not None:
            given["path"] = input_path
        if cls.kind == "source":
            data = {"output": output_dir, "resolution": resolution, "sources": [{cls.name: given}]}
        else:
            src = Path(input_dir)
            source = "dataset" if (src / "manifest.json").is_file() else "folder"
            data = {"output": output_dir, "resolution": resolution, "sources": [{source: {"path": str(src)}}],
                    "steps": [{cls.name: given}]}
        pipeline = parse_pipeline(data, host, Path.cwd(), lines=_Lines(None, f"lorakit {cls.name}"), path=None)
        result = Runner(pipeline, console=console, workers=workers, force=force).run()
        print_summary(result)
        _fail_if_crashed(result)

    help_text = click_help(cls.describe()) + ("\n\nExample:\n\n\b\n" + cls.example if cls.example else "")
    return click.Command(cls.name, params=params, callback=callback, help=help_text, short_help=cls.summary)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # `kill` ends a run like Ctrl-C: finished results stay cached


def main():
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="lorakit")
