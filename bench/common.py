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


def rotated(items: Sequence, round_index: int) -> list:
    """``items`` rotated left by ``round_index`` (mod their number): one round's order in an
    interleaved benchmark, so that no variant always runs first or right after the same one."""
    k = round_index % len(items)
    return list(items[k:]) + list(items[:k])


def paired_median(values: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of ``values[i] / base[i]``, both measured in round i: robust to load
    that drifts between rounds, unlike the ratio of the two medians."""
    return statistics.median(v / b for v, b in zip(values, base))


def interleaved_rounds(runs: dict[str, Callable[[], int]], *, repeats: int, expected: int,
                       cpu_seconds: Callable[[str], float]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every variant once per round, in :func:`rotated` order: round 0 warms up (workers,
    pipelines, page cache), rounds 1..``repeats`` are measured.

    Args:
        runs: name -> a callable that runs one pass and returns how many items it processed,
            which must be ``expected`` (else RuntimeError).
        cpu_seconds: name -> a CPU-time clock for that variant (e.g. this process's plus its
            worker processes'), read before and after each pass.

    Returns ``(rates, cpu_ms)``: per name, items/s and CPU milliseconds per item for each
    measured round, in round order (so ratios can be paired by round).  Prints each round.
    """
    names = list(runs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu_ms: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats + 1):
        rate = {}
        for name in rotated(names, round_index):
            start, cpu_start = time.perf_counter(), cpu_seconds(name)
            count = runs[name]()
            elapsed = time.perf_counter() - start
            cpu_used = cpu_seconds(name) - cpu_start
            if count != expected:
                raise RuntimeError(f"{name}: {count} items in a pass of {expected}")
            rate[name] = count / elapsed
            if round_index:
                rates[name].append(count / elapsed)
                cpu_ms[name].append(cpu_used * 1e3 / count)
        print(f"round {round_index}{' (warm-up)' if round_index == 0 else ''}: items/s "
              + ", ".join(f"{name.split()[0]} {rate[name]:.0f}" for name in names), flush=True)
    return rates, cpu_ms
