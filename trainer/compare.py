"""``lorakit compare``: the X/Y plot every guide ends with, epochs x weights, to pick the best epoch.

One grid per prompt: a row per LoRA file (epoch), a column for the base model without the LoRA and
one per weight; every cell of a prompt uses the same seed, so the only difference between two
cells is the LoRA and its weight. Written as one PNG (labels drawn with Pillow) and an HTML page
whose table shows each cell (in a ``<name>-cells/`` folder beside it) with its label.

LoRAs are applied by merging their weight changes into the base weights (``trainer/lora_file.py``:
LoRA, LoCon, LoHa, LoKr, IA3, Diag-OFT, DoRA) and undone after each cell; a file whose names the
merge cannot place goes through diffusers' ``load_lora_weights``.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from lorakit.plugin_sdk import LorakitError

# Layout of the grid, in pixels.
LABEL_WIDTH = 200
HEADER_HEIGHT = 40
PROMPT_HEIGHT = 36
GAP = 4
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
MAX_PROMPTS = 64
MAX_SIDE = 2048


@dataclass
class Prompt:
    """One line of a prompts file (kohya's sample-prompt options ``--n --w --h --d --s --l`` allowed)."""

    text: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None


@dataclass
class Grid:
    """The rendered comparison: the cells by (prompt index, row, column) and where they are in the PNG."""

    image: Any
    columns: list[str]
    rows: list[str]
    prompts: list[Prompt]
    cells: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    boxes: dict[tuple[int, int, int], tuple[int, int, int, int]] = field(default_factory=dict)


def parse_weights(text: str, where: str = "--weights") -> list[float]:
    try:
        weights = [float(w) for w in str(text).replace(" ", "").split(",") if w]
    except ValueError:
        raise LorakitError(f"{where}: {text!r} is not a comma-separated list of numbers (e.g. 0.4,0.7,1.0)") from None
    if not weights:
        raise LorakitError(f"{where}: give at least one weight (e.g. 0.4,0.7,1.0)")
    return weights


def parse_prompt(line: str, where: str) -> Prompt:
    """``a photo of mychar --n lowres --w 512 --h 768 --d 7 --s 20 --l 7`` (kohya's sample syntax)."""
    parts = re.split(r"\s--(?=[nwhdsl]\s)", " " + line.strip())
    prompt = Prompt(text=parts[0].strip())
    numbers = {"w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("steps", int), "l": ("cfg", float)}
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        value = value.strip()
        if key == "n":
            prompt.negative = value
            continue
        name, kind = numbers[key]
        try:
            setattr(prompt, name, kind(value))
        except ValueError:
            raise LorakitError(f"{where}: --{key} {value!r} is not a number") from None
    if not prompt.text:
        raise LorakitError(f"{where}: empty prompt")
    for side in (prompt.width, prompt.height):
        if side is not None and not (64 <= side <= MAX_SIDE and side % 8 == 0):
            raise LorakitError(f"{where}: image sides are multiples of 8 from 64 to {MAX_SIDE}, not {side}")
    return prompt


def read_prompts(path: str | Path) -> list[Prompt]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LorakitError(f"{path}: cannot read the prompts file ({exc})") from None
    prompts = [parse_prompt(line, f"{path}:{n}") for n, line in enumerate(lines, 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise LorakitError(f"{path}: no prompts (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise LorakitError(f"{path}: {len(prompts)} prompts; at most {MAX_PROMPTS} in one comparison")
    return prompts


def row_label(path: Path) -> str:
    """``name, epoch N`` from the file's metadata when it says, else the file name."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        meta = {}
    epoch = meta.get("ss_epoch")
    return f"{path.stem}\nepoch {epoch}" if epoch and epoch.isdigit() else path.stem


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font, width: int, draw) -> str:
    """Cut ``text`` with an ellipsis so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


class Renderer:
    """The base pipeline, and the images of one prompt with a LoRA file at a weight."""

    def __init__(self, base_model: str, *, vae=None, base_config=None, device: str = "auto", steps: int = 20,
                 cfg: float = 7.0, size: int | None = None, seed: int = 42, v_prediction=None):
        import torch

        from lorakit.plugin_sdk import pick_device

        from .models import load_pipeline

        self.device = pick_device(device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.pipe = load_pipeline(base_model, vae=vae, device=self.device, dtype=dtype, config=base_config,
                                  v_prediction=v_prediction)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.cfg, self.seed = steps, cfg, seed
        self.size = size or (1024 if hasattr(self.pipe, "text_encoder_2") else 512)

    def image(self, prompt: Prompt, index: int):
        import torch

        generator = torch.Generator(device="cpu").manual_seed(prompt.seed if prompt.seed is not None
                                                              else self.seed + index)
        return self.pipe(prompt.text, negative_prompt=prompt.negative or None,
                         num_inference_steps=prompt.steps or self.steps, guidance_scale=prompt.cfg or self.cfg,
                         width=prompt.width or self.size, height=prompt.height or self.size,
                         generator=generator).images[0]

    def with_lora(self, path: Path, weight: float):
        """A context in which the pipeline has the LoRA at ``weight``."""
        import contextlib

        from .lora_file import applied, model_layers, read_lora

        modules, _ = read_lora(path)
        layers = model_layers(self.pipe)
        if all(name in layers for name in modules):
            return applied(self.pipe, modules, weight, str(path))

        @contextlib.contextmanager
        def through_diffusers():
            try:
                self.pipe.load_lora_weights(str(path), adapter_name="compare")
            except Exception as exc:
                raise LorakitError(f"{path}: neither lorakit's merge nor diffusers can place this LoRA on the base "
                                   f"model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
            try:
                self.pipe.set_adapters(["compare"], adapter_weights=[weight])
                yield
            finally:
                self.pipe.delete_adapters("compare")

        return through_diffusers()


def compare(loras: list[Path], prompts: list[Prompt], weights: list[float], renderer: Renderer,
            progress=None) -> Grid:
    """Render every cell and lay out the grid (a section per prompt)."""
    from PIL import Image, ImageDraw

    columns = ["no LoRA"] + [f"weight {w:g}" for w in weights]
    rows = [row_label(p) for p in loras]
    cells: dict[tuple[int, int, int], Any] = {}
    for p, prompt in enumerate(prompts):
        base = renderer.image(prompt, p)
        for r, path in enumerate(loras):
            cells[(p, r, 0)] = base  # the same seed without the LoRA: one image serves every row
            for c, weight in enumerate(weights, start=1):
                with renderer.with_lora(path, weight):
                    cells[(p, r, c)] = renderer.image(prompt, p)
                if progress:
                    progress()
    cell_w = max(img.width for img in cells.values())
    cell_h = max(img.height for img in cells.values())
    width = LABEL_WIDTH + len(columns) * (cell_w + GAP)
    section = PROMPT_HEIGHT + HEADER_HEIGHT + len(rows) * (cell_h + GAP)
    grid = Image.new("RGB", (width, len(prompts) * section), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font, small = _font(18), _font(14)
    boxes = {}
    for p, prompt in enumerate(prompts):
        top = p * section
        draw.text((GAP, top + 8), _fit(f"prompt {p + 1}: {prompt.text}", font, width - 2 * GAP, draw), fill=INK,
                  font=font)
        draw.text((GAP, top + PROMPT_HEIGHT + 10), "LoRA weight:", fill=INK, font=font)
        for c, label in enumerate(columns):
            x = LABEL_WIDTH + c * (cell_w + GAP)
            if c and draw.textlength(label, font=font) > cell_w - 8:
                label = f"{weights[c - 1]:g}"  # a narrow cell shows the number only
            draw.text((x + 4, top + PROMPT_HEIGHT + 10), _fit(label, font, cell_w - 8, draw), fill=INK, font=font)
        for r, label in enumerate(rows):
            y = top + PROMPT_HEIGHT + HEADER_HEIGHT + r * (cell_h + GAP)
            for n, line in enumerate(label.split("\n")):
                draw.text((GAP, y + 8 + 20 * n), _fit(line, small, LABEL_WIDTH - 2 * GAP, draw), fill=INK, font=small)
            for c in range(len(columns)):
                x = LABEL_WIDTH + c * (cell_w + GAP)
                image = cells[(p, r, c)]
                grid.paste(image.convert("RGB"), (x, y))
                boxes[(p, r, c)] = (x, y, x + image.width, y + image.height)
    return Grid(grid, columns, rows, prompts, cells, boxes)


def write(grid: Grid, output: Path) -> tuple[Path, Path]:
    """The PNG, the HTML page beside it and its cell images (``<name>-cells/``), all written atomically."""
    from lorakit.plugin_sdk import atomic_write_text, save_image

    output = Path(output)
    save_image(grid.image, output)
    folder = output.with_name(f"{output.stem}-cells")
    folder.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(output.stem)}: epochs x weights</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{padding:4px;vertical-align:top;text-align:center}th.row{text-align:left;white-space:pre-line}"
        "img{max-width:384px;height:auto;display:block}caption{text-align:left;font-weight:bold;padding:4px}"
        "</style></head><body>",
        f'<h1>{html.escape(output.stem)}</h1><p><a href="{html.escape(output.name)}">the whole grid as one PNG</a></p>',
    ]
    for p, prompt in enumerate(grid.prompts):
        caption = html.escape(prompt.text) + (f" (negative: {html.escape(prompt.negative)})" if prompt.negative else "")
        parts.append(f"<table><caption>prompt {p + 1}: {caption}</caption><tr><th></th>"
                     + "".join(f"<th>{html.escape(c)}</th>" for c in grid.columns) + "</tr>")
        for r, label in enumerate(grid.rows):
            parts.append(f'<tr><th class="row">{html.escape(label)}</th>')
            for c, column in enumerate(grid.columns):
                name = f"p{p + 1:02d}-r{r + 1:02d}-c{c:02d}.png"
                save_image(grid.cells[(p, r, c)], folder / name)
                alt = html.escape(f"{label.replace(chr(10), ' ')}, {column}")
                parts.append(f'<td><img src="{html.escape(folder.name)}/{name}" alt="{alt}" title="{alt}"></td>')
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    page = output.with_suffix(".html")
    atomic_write_text(page, "\n".join(parts) + "\n")
    return output, page


def compare_files(loras: list[Path], prompts: list[Prompt], weights: list[float], output: Path, *, base_model: str,
                  console=None, **renderer_options) -> tuple[Path, Path]:
    """Load the base model, render the grid with a progress bar, write the PNG and the HTML page."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    for path in loras:
        if not Path(path).is_file():
            raise LorakitError(f"{path}: no such LoRA file")
        if Path(path).suffix.lower() != ".safetensors":
            raise LorakitError(f"{path}: LoRA files are read only as .safetensors (pickled files can run code)")
    renderer = Renderer(base_model, **renderer_options)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("rendering the comparison", total=len(prompts) * len(loras) * len(weights))
        grid = compare([Path(p) for p in loras], prompts, weights, renderer, progress=lambda: progress.advance(task))
    return write(grid, output)


def compare_after_training(trainer, final: Path) -> tuple[Path, Path] | None:
    """The trainer's end-of-run comparison of its epoch saves (``compare_epochs: true``)."""
    config = trainer.config
    files = [p for p in trainer.saved if p.is_file()] + [final]
    prompts = [parse_prompt(text, "sample_prompts") for text in config.sample_prompts]
    output = final.with_name(f"{final.stem}-compare.png")
    return compare_files(files, prompts, parse_weights(config.compare_weights, "compare_weights"), output,
                         base_model=config.base_model, vae=config.vae, base_config=config.base_config,
                         device=config.device, steps=config.sample_steps, size=trainer.data_.resolution,
                         seed=config.seed, console=trainer.console, v_prediction=config.v_prediction)


def check_compare_settings(values: dict[str, Any], where: str) -> None:
    """``compare_epochs`` needs prompts and a valid list of weights (checked before training starts)."""
    if not values.get("compare_epochs"):
        return
    if not values.get("sample_prompts"):
        raise LorakitError(f"{where}: train setting 'compare_epochs' needs 'sample_prompts' (the grid's prompts)")
    parse_weights(values.get("compare_weights") or "", f"{where}: train setting 'compare_weights'")
    for text in values["sample_prompts"]:
        parse_prompt(text, f"{where}: sample_prompts")


def build_command() -> click.Command:
    epilog = """\b
Examples:
  lorakit compare out/mychar-0000*.safetensors out/mychar.safetensors \\
      --prompts prompts.txt --base-model sd15.safetensors --weights 0.5,1
  lorakit compare a.safetensors b.safetensors --prompts prompts.txt \\
      --base-model sdxl.safetensors --output ab.png --steps 28 --seed 7

\b
prompts.txt holds one prompt per line (# comments allowed), optionally with
kohya's sample options: mychar, smile --n lowres --w 512 --h 768 --d 7"""

    @click.command("compare", epilog=epilog, short_help="Grid of epochs x LoRA weights to pick the best epoch.")
    @click.argument("loras", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="text file, one prompt per line")
    @click.option("--base-model", required=True, help="the base model: .safetensors file, diffusers folder or hub id")
    @click.option("--weights", default="0.4,0.7,1.0", show_default=True, help="LoRA weights, one column each")
    @click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
                  help="the grid PNG (default: <first LoRA>-compare.png); the HTML page goes beside it")
    @click.option("--seed", default=42, show_default=True, type=int, help="seed of prompt 1 (prompt N: seed+N-1)")
    @click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 200), help="sampling steps")
    @click.option("--cfg", default=7.0, show_default=True, type=float, help="guidance scale")
    @click.option("--size", type=click.IntRange(64, MAX_SIDE), help="image side (default: 512 SD1, 1024 SDXL)")
    @click.option("--vae", help="external VAE (.safetensors, folder or hub id)")
    @click.option("--base-config", help="configs for a single-file base model offline (a diffusers folder)")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]")
    def compare_command(loras, prompts_file, base_model, weights, output, seed, steps, cfg, size, vae, base_config,
                        device):
        """Render the same prompts and seeds with each LoRA file (rows: epochs) at each weight
        (columns), next to the base model without the LoRA; writes a labelled PNG grid and an HTML
        page."""
        from rich.console import Console

        if size is not None and size % 8:
            raise LorakitError(f"--size {size}: the image side must be a multiple of 8")
        prompts = read_prompts(prompts_file)
        output = output or loras[0].with_name(f"{loras[0].stem}-compare.png")
        if output.suffix.lower() != ".png":
            raise LorakitError(f"--output {output}: the grid is written as a .png")
        png, page = compare_files(list(loras), prompts, parse_weights(weights), output, base_model=base_model,
                                  vae=vae, base_config=base_config, device=device, steps=steps, cfg=cfg, size=size,
                                  seed=seed, console=Console(stderr=True))
        click.echo(f"{png}\n{page}")

    return compare_command


__all__ = ["compare", "compare_files", "read_prompts", "parse_weights", "write", "Renderer", "Grid",
           "compare_after_training", "check_compare_settings"]
