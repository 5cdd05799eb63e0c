"""The reward contract: registry, plugins, input normalisation, output checks, composite, TRL calling convention."""

from __future__ import annotations

import dataclasses
import math
import sys
import textwrap

import numpy as np
import pytest
from argrpo.rewards.base import (
    REWARDS,
    CompositeReward,
    Reward,
    RewardError,
    RewardOutput,
    RewardSpec,
    as_uint8_images,
    build_reward,
    build_rewards,
    register_reward,
)
from PIL import Image


def mean_pixel(prompts, images, **_):
    return [float(im.mean()) for im in images]


def images(n=4, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------ inputs


def test_image_forms_normalise_to_the_same_arrays():
    arr = images(3)
    ref = [a for a in arr]
    pil = [Image.fromarray(a) for a in arr]
    rgba = [np.concatenate([a, np.full(a.shape[:2] + (1,), 7, np.uint8)], axis=2) for a in arr]
    for form in (arr, ref, pil, rgba):
        got = as_uint8_images(form)
        assert len(got) == 3 and all(g.dtype == np.uint8 and g.shape == (8, 8, 3) for g in got)
        assert all(np.array_equal(g, r) for g, r in zip(got, ref))
    gray = as_uint8_images([arr[0, :, :, 0]])[0]
    assert gray.shape == (8, 8, 3) and np.array_equal(gray[:, :, 2], arr[0, :, :, 0])
    with pytest.raises(ValueError, match="uint8"):
        as_uint8_images(arr.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        as_uint8_images(arr[0])


def test_every_form_gives_the_same_scores():
    r = build_reward(mean_pixel)
    arr = images(3)
    a = list(r(["p"] * 3, arr))
    assert a == list(r(["p"] * 3, [Image.fromarray(x) for x in arr])) == list(r(["p"] * 3, list(arr)))
    assert a == pytest.approx([float(x.mean()) for x in arr])


# ------------------------------------------------------------------ registry and plugins


def test_registry_refuses_duplicates_and_unknown_names():
    @register_reward("_test_const")
    class Const(Reward):
        def __init__(self, value=1.0, **kw):
            super().__init__(**kw)
            self.value = value

        def score(self, prompts, images, **metadata):
            return [self.value] * len(prompts)

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_reward("_test_const")(Const)
        r = build_reward("_test_const", value=0.25)
        assert list(r(["a", "b"], images(2))) == [0.25, 0.25]
        assert r.__name__ == "_test_const"
    finally:
        REWARDS.pop("_test_const")
    with pytest.raises(ValueError, match="unknown reward 'nope'.*registered:.*geneval"):
        build_reward("nope")


PLUGIN = """
    import numpy as np

    def brightness(prompts, images, scale=1.0, **metadata):
        return [scale * float(np.asarray(im).mean()) / 255 for im in images]

    class Length:
        def __init__(self, bonus=0.0):
            self.bonus = bonus

        def __call__(self, prompts, images, **metadata):
            return [len(p) + self.bonus for p in prompts]
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_rewards.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("userpkg", "userpkg.my_rewards"):
        sys.modules.pop(name, None)


def test_plugin_from_yaml_config(plugin_dir):
    from argrpo.config import load_config

    @dataclasses.dataclass
    class Cfg:
        rewards: list[RewardSpec] = dataclasses.field(default_factory=list)

    path = plugin_dir / "rewards.yaml"
    path.write_text(textwrap.dedent("""
        rewards:
          - name: userpkg.my_rewards:brightness
            weight: 2.0
            kwargs: {scale: 0.5}
          - name: userpkg.my_rewards:Length
            kwargs: {bonus: 1.0}
    """))
    cfg = load_config(Cfg, path)
    reward = build_rewards(cfg.rewards)
    imgs = images(2)
    out = reward(["ab", "abcd"], imgs)
    bright = [0.5 * float(im.mean()) / 255 for im in imgs]
    assert list(out) == pytest.approx([2 * bright[0] + 3, 2 * bright[1] + 5])
    assert out.extras["userpkg.my_rewards:brightness"] == pytest.approx(bright)
    assert out.extras["userpkg.my_rewards:Length"] == [3.0, 5.0]
    single = build_reward("userpkg.my_rewards:brightness")
    assert single.__name__ == "brightness"


def test_plugin_errors_are_clear(plugin_dir):
    with pytest.raises(ValueError, match="cannot import module 'userpkg.missing'.*PYTHONPATH"):
        build_reward("userpkg.missing:f")
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        build_reward("userpkg.my_rewards:nothing")


# ------------------------------------------------------------------ output checks


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda p, i, **m: [1.0] * (len(p) - 1), "returned 3 scores for 4 samples"),
        (lambda p, i, **m: [1.0, float("nan"), 0.0, 0.0], "score 1 is nan"),
        (lambda p, i, **m: [1.0, 0.0, math.inf, 0.0], "score 2 is inf"),
        (lambda p, i, **m: ["x"] * len(p), "score 0 is str"),
        (lambda p, i, **m: 1 / 0, "raised ZeroDivisionError"),
        (lambda p, i, **m: RewardOutput([1.0] * 4, {"sub": [1.0, 2.0]}), "extra 'sub' has 2 values"),
    ],
)
def test_bad_outputs_raise_naming_reward_and_batch(bad, match):
    r = build_reward(bad, name="flaky")

    class State:
        global_step = 7

    with pytest.raises(RewardError, match=match) as err:
        r(prompts=["a red cube", "b", "c", "d"], images=images(4), trainer_state=State())
    msg = str(err.value)
    assert "reward 'flaky'" in msg and "step 7" in msg and "4 samples" in msg and "'a red cube'" in msg


def test_none_means_not_applicable_and_passes():
    r = build_reward(lambda p, i, **m: [None, 1, np.float32(0.5), True], name="sparse")
    assert list(r(["a"] * 4, images(4))) == [None, 1.0, 0.5, 1.0]


def test_trl_calling_convention():
    """TRL passes prompts/completions/completion_ids, dataset columns, rollout extras and control callbacks."""
    from trl.trainer.utils import get_callable_name

    seen = {}

    def needs_meta(prompts, images, metadata, **rest):
        seen.update(rest)
        return RewardOutput([float(m["k"]) for m in metadata], {"half": [m["k"] / 2 for m in metadata]})

    r = build_reward(needs_meta, name="meta_reward")
    logged, extra_cols = {}, {}
    out = r(
        prompts=[{"prompt": "x"}, "y"], completions=["", ""], completion_ids=[[1], [2]],
        images=list(images(2)), metadata=[{"k": 1}, {"k": 3}], trainer_state=object(),
        log_metric=lambda k, v: logged.__setitem__(k, v), log_extra=lambda k, v: extra_cols.__setitem__(k, v),
    )
    assert isinstance(out, list) and out == [1.0, 3.0]
    assert logged == {"meta_reward/half": 1.0}
    assert seen == {}  # control keys never reach the reward
    assert get_callable_name(r) == "meta_reward"
    with pytest.raises(RewardError, match="metadata column 'metadata' has 1 entries for 2 samples"):
        r(prompts=["x", "y"], images=images(2), metadata=[{"k": 1}])


# ------------------------------------------------------------------ composite


def const(values):
    return lambda p, i, **m: list(values)


def test_composite_weights_and_nones():
    comp = CompositeReward({"a": (const([1.0, 2.0, None]), 0.5), "b": (const([10.0, None, None]), 2.0)})
    out = comp(["p"] * 3, images(3))
    assert list(out) == [0.5 + 20.0, 1.0, None]
    assert out.extras["a"] == [1.0, 2.0, None] and out.extras["b"] == [10.0, None, None]


def test_composite_batch_and_running_normalisation():
    a = [1.0, 2.0, 3.0, 6.0]
    comp = CompositeReward({"a": (const(a), 1.0), "b": (const([5.0] * 4), 1.0)}, normalize="batch")
    out = comp(["p"] * 4, images(4))
    z = (np.array(a) - np.mean(a)) / (np.std(a) + 1e-6)
    assert list(out) == pytest.approx(list(z))  # a constant component normalises to 0
    assert out.extras["a/norm"] == pytest.approx(list(z))

    batches = [[1.0, 2.0], [3.0, 10.0]]
    it = iter(batches)
    run = CompositeReward({"a": (lambda p, i, **m: next(it), 1.0)}, normalize="running")
    run(["p"] * 2, images(2))
    second = run(["p"] * 2, images(2))
    seen = np.array(batches[0] + batches[1])
    want = (np.array(batches[1]) - seen.mean()) / (seen.std() + 1e-6)
    assert list(second) == pytest.approx(list(want))
    assert run.state_dict()["a"]["count"] == 4


def const_a(prompts, images, **_):
    return [1.0, 3.0]


def const_b(prompts, images, **_):
    return [10.0, 30.0]


def test_per_reward_normalisation():
    """A spec's own ``normalize`` overrides the composite's: here only ``a`` is z-scored."""
    comp = CompositeReward([RewardSpec(f"{__name__}:const_a", alias="a", normalize="batch"),
                            RewardSpec(f"{__name__}:const_b", alias="b", weight=0.5)], normalize="none")
    out = comp(["p"] * 2, images(2))
    assert list(out) == pytest.approx([-1.0 + 5.0, 1.0 + 15.0], abs=1e-5)
    assert "a/norm" in out.extras and "b/norm" not in out.extras
    with pytest.raises(ValueError, match="normalize must be none, batch or running"):
        RewardSpec("x", normalize="zscore")


def test_composite_names_the_failing_component():
    comp = CompositeReward({"ok": (const([1.0, 1.0]), 1.0), "broken": (const([1.0, float("nan")]), 1.0)})
    with pytest.raises(RewardError, match="reward 'broken'.*score 1 is nan"):
        comp(["p", "q"], images(2))
    with pytest.raises(ValueError, match="normalize"):
        CompositeReward({"a": (const([1.0]), 1.0)}, normalize="zscore")
