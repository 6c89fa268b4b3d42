"""What the paired benches share: one side of a pair run in a fresh Python process.

``run_script(side, script, args, cwd)`` runs ``python -c SCRIPT ARGS...``, takes the last line of its
stdout as a JSON object (the script's own figures: seconds, peak memory...) and adds the process's
CPU time (user + system, from the children's rusage) and the load average when it started.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def run_script(side: str, script: str, args: list[str], cwd: Path) -> dict:
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=str(cwd))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["load"] = load
    return result
