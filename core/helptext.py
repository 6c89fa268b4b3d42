"""Help text that reads well at any terminal width (80 columns included) and copies cleanly.

Step docstrings are hard-wrapped in the source; printed as they are, they re-wrap raggedly on a
narrower terminal. ``logical_lines`` undoes the source wrapping (joining the lines of a paragraph)
while keeping the line breaks that mean something: list items, ``name: ...`` definitions, indented
examples. Everything from a docstring or a user is printed as plain text, never as rich markup, so
``[katana, sheath]`` stays on the screen.
"""
from __future__ import annotations

import re
import textwrap

from rich.console import Console
from rich.text import Text

_STARTS_ITEM = re.compile(r"^(\s+\S|[-*•]\s|\d+[.)]\s|[A-Za-z_][\w-]*:\s|\$ |lorakit\s)")


def logical_lines(text: str) -> list[str]:
    """Paragraphs and items of ``text``, each one line; "" marks a paragraph break."""
    out: list[str] = []
    for raw in (text or "").strip("\n").splitlines():
        line = raw.rstrip()
        if line.strip() == "\b":  # click's "keep this paragraph as it is" marker: not text
            line = ""
        if not line.strip():
            if out and out[-1] != "":
                out.append("")
            continue
        joinable = out and out[-1] != "" and not _STARTS_ITEM.match(line) and not out[-1].startswith(" ")
        if joinable:
            out[-1] = out[-1] + " " + line.strip()
        else:
            out.append(line if line.startswith(" ") else line.strip())
    while out and out[-1] == "":
        out.pop()
    return out


def click_help(text: str) -> str:
    """``text`` for click: every logical line its own paragraph; indented lines kept verbatim."""
    parts: list[str] = []
    for line in logical_lines(text):
        if line == "":
            continue
        parts.append("\b\n" + line if line.startswith(" ") else line)
    return "\n\n".join(parts)


def wrapped(text: str, width: int, indent: int = 0) -> str:
    """``text`` wrapped to ``width`` columns with ``indent``; words (paths, URLs) are never split."""
    pad = " " * indent
    lines = []
    for line in logical_lines(text):
        if line == "":
            lines.append("")
        elif line.startswith(" "):  # an indented example: kept as it is, one line
            lines.append(pad + line)
        else:
            lines.append(textwrap.fill(line, width=max(width, indent + 20), initial_indent=pad,
                                       subsequent_indent=pad, break_long_words=False, break_on_hyphens=False))
    return "\n".join(lines)


def print_plain(console: Console, text: str, indent: int = 0, style: str | None = None) -> None:
    """Print ``text`` wrapped to the console as plain text (no markup, no trailing spaces)."""
    console.print(Text(wrapped(text, console.width - 1, indent), style=style or ""), soft_wrap=True, highlight=False)
