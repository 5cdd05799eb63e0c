"""The benchmark suite's plumbing: RESULTS.md collection and the peak-RSS probe (no timings asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.common import environment, write_results
from bench.memory import peak_rss_mib, reset_peak_rss, rss_mib
from bench.run_all import SUITE, _short_cpu, collect


def _summ(v):
    return {"median": v, "min": v, "max": v, "spread": 0.0, "n": 1, "values": [v]}


def test_collect_makes_one_table_with_targets_and_environment(tmp_path):
    write_results("step", {
        "modes": {m: {"step_s": _summ(s), **{p: _summ(1.0) for p in ("rollout", "rollout_generate", "decode",
                                                                        "reward", "learn", "sync")}}
                  for m, s in (("sync", 10.0), ("async", 6.0))},
        "async_over_sync": 0.6, "learn_over_rollout_generate_sync": 1.1, "ideal_overlap_ratio": 0.5,
    }, [{"mode": "sync"}], out_dir=tmp_path)
    write_results("memory", {
        "summary": {"full/visual": {"peak_rss_mib": _summ(4000.0), "rss_before_steps_mib": _summ(1500.0)},
                    "lora/visual": {"peak_rss_mib": _summ(2800.0), "rss_before_steps_mib": _summ(1500.0)}},
        "ratios": {"lora_over_full/visual": 0.7},
    }, [{"variant": "full/visual"}], out_dir=tmp_path)
    write_results("mystery", {"targets": {"widgets >= 2": {"value": 3, "met": True}}},
                  [{"thing": "a", "size": 1, "rate": 2.5}], out_dir=tmp_path)
    (tmp_path / "broken.json").write_text("{not json")

    md = collect(tmp_path)
    lines = md.splitlines()
    assert any(x.startswith("- collected on:") for x in lines)
    assert any(x.startswith("- versions:") and "torch" in x and "trl" in x and "ray" in x for x in lines)
    assert any(x.startswith("- date:") for x in lines)
    assert sum(1 for x in lines if x.startswith("|---")) == 2  # the headline table, then every figure
    head = lines.index("## Headline")
    assert head < lines.index("## Every figure")
    headline = lines[head:lines.index("## Every figure")]
    # a headline figure comes from its benchmark's rows; one without a result file says so
    assert any("async / sync step time" in x and "0.6" in x and "| yes |" in x for x in headline)
    assert any("LoRA / full" in x and "0.7" in x and "| NO |" in x for x in headline)
    assert any(x.startswith("| rollout: torch engine / HF generate") and "not measured yet" in x for x in headline)
    all_rows = lines[lines.index("## Every figure"):]
    rows = [x for x in all_rows if x.startswith("| ")][1:]
    step = next(r for r in rows if "async / sync step time" in r)
    assert "0.6" in step and "<= 0.7" in step and "| yes |" in step
    mem = next(r for r in rows if "LoRA / full peak RSS" in r)
    assert "0.7" in mem and "| NO |" in mem  # a missed target is shown as missed
    assert any("mystery" in r and "widgets >= 2" in r for r in rows)  # unknown benchmarks still appear
    assert any("broken" in r and "unreadable" in r for r in rows)
    cpu = _short_cpu(environment(1)["cpu"])
    assert next(x for x in lines if x.startswith("| benchmark")).rstrip().endswith("| cpu |")
    assert cpu in step  # each row names the machine that measured it


def test_suite_names_every_benchmark_module_once():
    names = [b.name for b in SUITE]
    assert len(names) == len(set(names))
    assert {"rollout", "step", "memory", "scaling"} <= set(names)


def test_peak_rss_probe_sees_an_allocation_after_a_reset():
    if not reset_peak_rss():
        pytest.skip("kernel without /proc/self/clear_refs peak reset")
    before = rss_mib()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert peak_rss_mib() >= before + 48
    del block
    assert reset_peak_rss()
    assert peak_rss_mib() < before + 48  # the reset forgot the freed block's peak
