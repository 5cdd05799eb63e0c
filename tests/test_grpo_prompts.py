"""The training prompt stream: weighting GenEval tags (data.tag_weights) and what a built run trains on."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from argrpo.config import ConfigError, load_config
from argrpo.grpo.config import GRPORunConfig
from argrpo.grpo.prompts import prompt_stream, weight_by_tag
from grpo_fixtures import run_overrides, shared_world


def rows(counts: dict[str, int]) -> list[dict]:
    return [{"prompt": f"{tag} {i}", "tag": tag} for tag, n in counts.items() for i in range(n)]


def test_weights_scale_each_tag_and_keep_file_order():
    specs = rows({"single_object": 8, "counting": 4, "colors": 4})
    out = weight_by_tag(specs, {"single_object": 0.25, "counting": 2.0})
    assert Counter(s["tag"] for s in out) == {"single_object": 2, "counting": 8, "colors": 4}
    # a fraction keeps the tag's first rows; w > 1 repeats every row; untouched tags stay as they were
    assert [s["prompt"] for s in out if s["tag"] == "single_object"] == ["single_object 0", "single_object 1"]
    assert Counter(s["prompt"] for s in out if s["tag"] == "counting") == {f"counting {i}": 2 for i in range(4)}
    assert [s["prompt"] for s in out if s["tag"] == "colors"] == [f"colors {i}" for i in range(4)]
    positions = [specs.index(s) for s in out]
    assert positions == sorted(positions)


def test_zero_weight_drops_a_tag_and_untagged_rows_keep_weight_one():
    specs = rows({"position": 3}) + [{"prompt": "a free caption"}]
    out = weight_by_tag(specs, {"position": 0})
    assert out == [{"prompt": "a free caption"}]


def test_bad_weights_fail_by_name():
    specs = rows({"colors": 2})
    with pytest.raises(ValueError, match=r"no training prompt has tag 'colour'.*\['colors'\]"):
        weight_by_tag(specs, {"colour": 1.0})
    with pytest.raises(ValueError, match="leave no training prompt"):
        weight_by_tag(specs, {"colors": 0})
    with pytest.raises(ConfigError, match=r"data.tag_weights.colors: expected a number >= 0"):
        load_config(GRPORunConfig, None, ["data.tag_weights.colors=-1"])


def test_weighted_stream_is_deterministic_and_proportional():
    specs = rows({"single_object": 40, "position": 40})
    w = weight_by_tag(specs, {"single_object": 0.5})
    a, b = prompt_stream(w, 10, 12, seed=3), prompt_stream(w, 10, 12, seed=3)
    assert a["prompt"] == b["prompt"]
    tags = Counter(json.loads(m)["tag"] for m in a["metadata"][:120])  # two epochs of the 60 weighted rows
    assert tags == {"single_object": 40, "position": 80}


def test_built_run_trains_on_the_weighted_prompts(tmp_path, monkeypatch):
    from argrpo.grpo.trainer import build_run

    world = shared_world()
    monkeypatch.syspath_prepend(str(world["plugins"]))
    # nothing is trained: max_steps only sets the stream's length, here more than one epoch of the 16 weighted rows
    sets = run_overrides(world, tmp_path, **{"grpo.max_steps": 12})
    sets += ["data.tag_weights.single_object=0", "data.tag_weights.two_object=0"]
    run = build_run(load_config(GRPORunConfig, None, sets))
    try:
        tags = Counter(json.loads(m)["tag"] for m in run.trainer.train_dataset["metadata"])
    finally:
        run.close()
    assert len(run.trainer.train_dataset) >= 16
    assert set(tags) == {"counting", "colors", "position", "color_attr"}
