"""Registers the ``lorakit train`` command through the same ``register_commands`` hook plugins use.

Its options are generated from the settings schema (``trainer/config.py``), so the command line,
config files and ``pipeline.yaml``'s ``train:`` section can never disagree.
"""
from __future__ import annotations

from pathlib import Path

import click

from lorakit.plugin_sdk import hookimpl

from .config import SETTINGS, load_config_file, show_config, validate_settings

# Options whose command-line spelling differs from the setting name.
CLI_NAMES = {"sample_prompts": "--sample-prompt"}

EPILOG = """\b
Examples:
  lorakit train dataset/ --base-model sd15.safetensors --output mychar.safetensors
  lorakit train dataset/ --base-model sdxl.safetensors --output out.safetensors \\
      --network-dim 16 --network-alpha 8 --optimizer prodigy --learning-rate 1 --lr-scheduler cosine
  lorakit train dataset/ --config train.toml --dry-run      # the plan: subsets, buckets, steps, memory
  lorakit train --show-config > train.toml                  # every setting with its default

\b
Settings come from (later wins): the defaults, --config FILE (TOML/YAML/JSON, or a pipeline.yaml's
train: section), then the options given here. DATASET is a lorakit dataset folder, its
manifest.json, or a kohya dataset folder (N_name subfolders or dataset_config.toml)."""


def _option(setting) -> click.Option:
    flag = CLI_NAMES.get(setting.name, "--" + setting.name.replace("_", "-"))
    default_text = "" if setting.default in (None, [], {}) else f" [default: {str(setting.default).lower() if isinstance(setting.default, bool) else setting.default}]"
    help_text = setting.help + default_text
    if setting.type is bool:
        negative = "--no-" + flag[2:]
        return click.Option([f"{flag}/{negative}", setting.name], default=None, help=help_text)
    if setting.type is list:
        return click.Option([flag, setting.name], multiple=True, help=help_text + " (repeat for several)")
    if setting.type is dict:
        return click.Option([flag, setting.name], default=None, metavar="JSON", help=help_text)
    metavar = "|".join(setting.choices) if setting.choices else {int: "N", float: "X"}.get(setting.type, "TEXT")
    if setting.is_path:
        metavar = "PATH"
    return click.Option([flag, setting.name], default=None, metavar=metavar, help=help_text)


def build_command() -> click.Command:
    def callback(dataset, config_file, show, dry, force, **options):
        from rich.console import Console

        from lorakit.plugin_sdk import LorakitError

        settings = load_config_file(config_file) if config_file else {}
        where = str(config_file) if config_file else "train options"
        base_dir = Path(config_file).parent if config_file else None
        config = validate_settings(settings, where, base_dir=base_dir)
        given = {k: v for k, v in options.items() if v is not None and v != ()}
        if given:
            config = config.replace("command line", **given)
        if show:
            click.echo(show_config(config), nl=False)
            return
        if dataset is None:
            raise LorakitError("lorakit train: DATASET is required (a dataset folder, manifest.json or kohya folder)")
        console = Console(stderr=True)
        from .api import dry_run, train

        if dry:
            dry_run(Path(dataset), config, console=console)
            return
        path = train(Path(dataset), config, console=console, force=force)
        click.echo(str(path))

    params = [
        click.Argument(["dataset"], required=False, type=click.Path(exists=True, path_type=Path)),
        click.Option(["--config", "config_file"], type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="read settings from a TOML, YAML or JSON file (a train: section is used when present)"),
        click.Option(["--show-config", "show"], is_flag=True,
                     help="print every setting (defaults, then --config and options applied) as TOML and exit"),
        click.Option(["--force", "force"], is_flag=True,
                     help="train even when the output is from the same dataset and settings, and overwrite "
                          "an output from another run"),
        click.Option(["--dry-run", "dry"], is_flag=True,
                     help="print the plan (subsets, repeats, buckets, steps, memory estimate) and exit"),
    ] + [_option(s) for s in SETTINGS]
    return click.Command(
        "train", callback=callback, params=params, epilog=EPILOG,
        help="Train a LoRA (SD1.x or SDXL) on a dataset; writes a kohya-format .safetensors that A1111, "
             "ComfyUI, Forge and diffusers load.",
        short_help="Train a LoRA on a dataset (SD1.x / SDXL).",
        context_settings={"max_content_width": 110},
    )


@hookimpl
def register_commands(cli):
    from . import compare, inspect

    cli.add_command(build_command())
    cli.add_command(inspect.build_command())
    cli.add_command(compare.build_command())
