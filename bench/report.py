"""The JSON every benchmark writes: its name, its settings, the machine it ran on, and its table rows."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def write_report(path: Path, benchmark: str, rows: list[dict], **settings) -> None:
    """Write {benchmark, **settings, machine, rows} to `path` (parents created) and say where."""
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, **settings, "machine": machine, "rows": rows}, indent=2))
    print(f"wrote {path}")
