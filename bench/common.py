"""Shared benchmark harness: warm-up, medians over repeats, a printed table, a JSON file.

Every bench script measures our code and its baseline in the same run on the same
data and reports medians and ratios (these machines are noisy; a single time
means little).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2,
              sync: Callable[[], None] | None = None) -> dict:
    """Run ``fn`` ``warmup`` times, then ``repeats`` times; return seconds as
    {'median', 'min', 'max', 'times'}."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "times": times}


def machine_info() -> dict:
    """Where the numbers came from: CPU model, cores, torch threads, date."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # torch missing is unusual but must not kill the report
        info["torch"] = f"unavailable: {exc}"
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) restricted to ``columns``; floats get 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def report(name: str, rows: Sequence[dict], columns: Sequence[str], *, extra: dict | None = None,
           out_dir: Path | None = None) -> Path:
    """Print the table and write ``bench/results/<name>.json`` (rows + machine info); return its path."""
    info = machine_info()
    print(f"\n## {name}  ({info['date']}, {info['cpu']}, {info['cores']} cores)\n")
    print(format_table(rows, columns))
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"name": name, "machine": info, "rows": list(rows), **(extra or {})},
                               indent=2, default=str))
    print(f"\n(wrote {path})")
    return path
