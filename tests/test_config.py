from dataclasses import dataclass, field

import pytest
from argrpo.config import ConfigError, describe, load_config


@dataclass
class Inner:
    """An inner section."""

    beta: float = field(default=0.0, metadata={"help": "KL weight"})
    names: list[str] = field(default_factory=lambda: ["a"], metadata={"help": "names"})


@dataclass
class Outer:
    lr: float = field(default=1e-5, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "steps"})
    mode: str = "sync"
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be sync or async, got {self.mode!r}")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 3.0e-5\ninner:\n  beta: 0.04\n")
    cfg = load_config(Outer, p, ["steps=7", "inner.names=[x, y]"])
    assert cfg.lr == 3e-5 and cfg.steps == 7
    assert cfg.inner.beta == 0.04 and cfg.inner.names == ["x", "y"]


def test_unknown_key_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  betta: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    msg = str(e.value)
    assert str(p) in msg and "inner.betta" in msg and "beta" in msg and "names" in msg


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match="steps: expected int"):
        load_config(Outer, None, ["steps=ten"])


def test_post_init_error_is_config_error():
    with pytest.raises(ConfigError, match="mode must be"):
        load_config(Outer, None, ["mode=fast"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_describe_documents_every_key():
    text = describe(Outer)
    for key in ("lr", "steps", "inner.beta", "inner.names", "learning rate", "KL weight"):
        assert key in text


def test_exponent_floats_without_dot(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-5\n")
    assert load_config(Outer, p).lr == 1e-5
    assert load_config(Outer, None, ["lr=3e-5"]).lr == 3e-5


@dataclass
class Item:
    name: str = "a"
    weight: float = 1.0


@dataclass
class WithList:
    items: list[Item] = field(default_factory=list)


def test_indexed_override_into_a_list(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("items:\n  - {name: x}\n  - {name: y, weight: 2}\n")
    cfg = load_config(WithList, p, ["items[1].weight=0.5", "items[0].name=z"])
    assert [(i.name, i.weight) for i in cfg.items] == [("z", 1.0), ("y", 0.5)]
    with pytest.raises(ConfigError, match="has no item 5"):
        load_config(WithList, p, ["items[5].weight=1"])
