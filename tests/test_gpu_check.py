"""bench/gpu_check.py in its CPU mode (--tiny --device cpu): the GPU check's own code on tiny shapes, so it cannot rot
between the rare runs on a GPU machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_GPU_MACHINE = ("ray", "vllm", "open_clip")


def test_cpu_mode_runs_from_the_source_tree_without_ray_vllm_or_open_clip(tmp_path):
    # as on the GPU machine: a script, argrpo imported from this tree (not the installed package), and the packages
    # that machine lacks unimportable (None in sys.modules makes every import of them fail)
    code = (
        "import runpy, sys\n"
        f"for m in {ABSENT_ON_THE_GPU_MACHINE!r}:\n"
        "    sys.modules[m] = None\n"
        f"sys.argv = ['bench/gpu_check.py', '--tiny', '--device', 'cpu', '--from-source', '--out', {str(tmp_path)!r}]\n"
        "runpy.run_path('bench/gpu_check.py', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["bootstrap"]["argrpo"].startswith("source tree")

    ro = res["rollout"]
    assert ro["checks"]["greedy_equal"] is True
    assert set(ro["checks"]["greedy_float32"]) == {"cfg1", "cfg3"}
    assert all(c["tokens"] == 32 and c["first_mismatch"] is None for c in ro["checks"]["greedy_float32"].values())
    assert ro["config"]["max_batch"] == 8
    runs = {(r["engine"], r["cfg"], r["batch"]): r for r in ro["runs"]}
    assert set(runs) == {(e, c, b) for e in ("torch", "hf_generate") for c in (1.0, 3.0) for b in (1, 8)}
    for (engine, _, batch), r in runs.items():
        assert r["tokens_timed"] == 32 and not r["extrapolated"] and not r["probe_only"]  # tiny images fit whole
        assert math.isclose(r["images_per_s"] * r["s_per_image"], 1.0)
        assert math.isclose(r["s_per_image"] * batch, r["seconds"])
        if engine == "torch":
            assert 0 < r["fraction_of_peak"] and r["flops"] > 0 and r["x_hf"] > 0
    assert ro["matmul_peak_flops_per_s"] > 0

    le = res["learner"]
    assert "skipped" not in le
    variants = le["variants"]
    assert [(v["tuning"], v["gradient_checkpointing"]) for v in variants] == [
        ("full", True), ("lora", True), ("full", False), ("lora", False)]
    for v in variants:
        assert v["steps"] == 2
        assert v["weight_tensors"] > 0 and v["weights_changed"] == v["weight_tensors"]  # every trainable tensor moved
        assert len(v["losses"]) == 2 and all(math.isfinite(x) for x in v["losses"])
        assert v["step_s"] > 0 and v["forward_backward_s"] > 0 and v["score_s"] > 0 and v["peak_memory_gib"] > 0
        assert v["tokens_per_completion"] == 32 and v["completions_per_step"] == 4
    full = next(v for v in variants if v["tuning"] == "full")
    lora = next(v for v in variants if v["tuning"] == "lora")
    assert lora["trainable_params"] < full["trainable_params"]

    ja = res["janus"]
    assert "error" not in ja and ja["checks"]["greedy_equal"] is True and ja["checks"]["greedy_float32"]["tokens"] == 16
    assert [(r["engine"], r["batch"]) for r in ja["runs"]] == [
        ("torch", 1), ("transformers_janus", 1), ("torch", 4), ("transformers_janus", 4)]
    assert all(r["tokens_timed"] == 16 and r["images_per_s"] > 0 and r["x_hf"] > 0 for r in ja["runs"])

    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Rollout" in md and "## Learner" in md and "## Janus-Pro" in md
    rollout_md = md[md.index("## Rollout"):md.index("## Janus-Pro")]
    assert rollout_md.count("| torch |") == 4 and rollout_md.count("| hf_generate |") == 4
    assert md.count("| transformers_janus |") == 2
    assert "| full, GC on |" in md and "| lora, GC off |" in md


def test_without_trl_the_learner_is_skipped_by_name_and_an_exhausted_budget_times_prefixes(tmp_path, monkeypatch):
    from bench import gpu_check

    monkeypatch.setitem(sys.modules, "trl", None)
    # a 1-second budget is spent before the first timed call: each call times only its probe's length (8 of 32
    # tokens) and scales it to the whole image
    rc = gpu_check.main(["--tiny", "--device", "cpu", "--budget-s", "1", "--wheels", str(tmp_path / "no-wheels"),
                         "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["bootstrap"]["wheels"] is None
    skipped = res["learner"]["skipped"]
    assert skipped.startswith("learner skipped: trl not importable") and "make gpu-wheels" in skipped
    assert res["learner"]["variants"] == []
    runs = res["rollout"]["runs"]
    assert res["rollout"]["checks"]["greedy_equal"] is True and len(runs) == 8
    for r in runs:
        assert r["extrapolated"] and r["probe_only"] and r["tokens_timed"] == 8
        assert math.isclose(r["s_per_image"], r["seconds"] * 32 / 8 / r["batch"])
    # the Janus section runs last: with the budget spent, each of its calls is skipped and says so
    assert res["janus"]["checks"]["greedy_equal"] is True
    assert len(res["janus"]["runs"]) == 4 and all(r["note"].startswith("skipped") for r in res["janus"]["runs"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert skipped in md
    assert sum("(est.)" in line for line in md.splitlines() if line.startswith("| ")) == 8
