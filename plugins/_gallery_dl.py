"""Driving gallery-dl (GPL-2.0) as a subprocess, never imported: one place for booru and gallerydl.

``run(...)`` writes a private config file (it may hold credentials: mode 0600, in a run folder that
is deleted afterwards, and a killed run's folder is deleted by the next run), starts
``python -m gallery_dl --config FILE URL`` and yields each post's metadata as gallery-dl's
``metadata`` post-processor appends it to ``progress.jsonl`` in the run folder (point the
post-processor's ``base-directory`` at the folder given to ``make_config``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from lorakit.plugin_sdk import LorakitError

PROGRESS_FILE = "progress.jsonl"
# Seconds gallery-dl may take to start (a Python program importing its extractors) before its first answer.
START_S = 20
STALLED: dict[str, Any] = {"stalled": True}  # yielded when gallery-dl went silent for longer than allowed


def remove_stale_run_dirs(tmp_dir: Path, prefix: str) -> None:
    """Delete the run folders ``PREFIX-PID-*`` (config with credentials) of lorakit processes that are gone."""
    for folder in tmp_dir.glob(f"{prefix}-*"):
        match = re.fullmatch(re.escape(prefix) + r"-(\d+)-.*", folder.name)
        pid = int(match.group(1)) if match else None
        if pid == os.getpid():
            continue
        if pid is not None:
            try:
                os.kill(pid, 0)
                continue  # that run is still going
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(folder, ignore_errors=True)


def run(make_config: Callable[[Path], dict[str, Any]], url: str, tmp_dir: Path, *, prefix: str,
        config_args: list[str] = (), silence_s: Callable[[bool], float] | None = None,
        explain: Callable[[int, list[str]], str]) -> Iterator[dict[str, Any]]:
    """Run gallery-dl on ``url``; yield each post's metadata dict as it arrives.

    ``make_config(run_dir)`` returns the config (its metadata post-processor writes to ``run_dir``);
    ``config_args`` come before lorakit's ``--config`` (e.g. ``--config-ignore`` or a user's config).
    ``silence_s(started)`` is how long gallery-dl may stay silent (``started``: an answer came
    already); past it the process is killed and ``STALLED`` is yielded. A non-zero exit raises
    ``LorakitError(explain(code, stderr_lines))``.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_run_dirs(tmp_dir, prefix)  # a killed run's config (it may hold credentials) goes first
    run_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=tmp_dir))
    proc = None
    try:
        config_path = run_dir / "gallery-dl.json"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(make_config(run_dir), fh)
        command = [sys.executable, "-m", "gallery_dl", *config_args, "--config", str(config_path), url]
        progress = run_dir / PROGRESS_FILE
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, encoding="utf-8", errors="replace")
        errors: list[str] = []
        reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
        reader.start()
        offset, buffer, last_news = 0, "", time.monotonic()
        while True:
            finished = proc.poll() is not None
            if progress.is_file():
                with open(progress, encoding="utf-8") as fh:
                    fh.seek(offset)
                    buffer += fh.read()
                    offset = fh.tell()
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
                        last_news = time.monotonic()  # time the caller spends on a post is not silence
            if finished:
                break
            if silence_s is not None and time.monotonic() - last_news > silence_s(bool(offset)):
                proc.kill()  # a site that never finishes its answer does not hang the run
                proc.wait()
                yield STALLED
                return
            time.sleep(0.1)
        reader.join(timeout=5)
        if proc.returncode != 0:
            raise LorakitError(explain(proc.returncode, errors))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
