"""The one dataclass decoder, the optional-dependency guard and the device policy."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from dualvitok._utils.decoding import from_dict
from dualvitok._utils.deps import require
from dualvitok.devices import resolve_device


@dataclass
class Inner:
    size: int = 1
    scale: float = 1.0
    name: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    stages: tuple[Inner, ...] = ()
    sizes: tuple[int, ...] = ()
    payload: dict | None = None
    flag: bool = False


def test_nested_sections_tuples_and_payloads():
    cfg = from_dict(Outer, {"inner": {"size": 3, "scale": 2}, "stages": [{"size": 4}, {}], "sizes": [1, 2],
                            "payload": {"a": [1]}, "flag": True})
    assert cfg.inner == Inner(3, 2.0) and isinstance(cfg.inner.scale, float)
    assert cfg.stages == (Inner(4), Inner()) and cfg.sizes == (1, 2) and cfg.payload == {"a": [1]} and cfg.flag
    assert from_dict(Outer, {"inner": None}) == Outer()  # an empty YAML section: its defaults


@pytest.mark.parametrize("data, message", [
    ({"inner": {"size": "4"}}, r"inner.size must be an integer, got '4' \(str\)"),
    ({"inner": {"size": True}}, r"inner.size must be an integer"),
    ({"flag": 1}, r"flag must be true or false"),
    ({"inner": {"name": 3}}, r"inner.name must be a string"),
    ({"inner": {"scale": float("nan")}}, r"inner.scale must be finite"),
    ({"sizes": [1, "2"]}, r"sizes\[1\] must be an integer"),
    ({"stages": [{}, {"size": 1.5}]}, r"stages\[1\].size must be an integer"),
    ({"inner": [1, 2]}, r"inner must be an object \(a dict of Inner fields\)"),
    ({"stages": [{"bogus": 1}]}, r"unknown config keys at stages\[0\] of Inner: \['bogus'\]"),
])
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(Outer, data)
    with pytest.raises(ValueError, match="must be a JSON object"):
        from_dict(Outer, None)


def test_unknown_keys_can_be_ignored_when_not_strict(caplog):
    assert from_dict(Inner, {"size": 2, "extra": 1}, strict=False) == Inner(2)
    assert "extra" in caplog.text


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(ImportError, match=r"LPIPS thing needs .*xyz.*'dualvitok\[eval\]'"):
        require("no_such_module_xyz", "eval", "the LPIPS thing")
    assert require("json", "eval").dumps([]) == "[]"


def test_device_policy():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type in (expected, "npu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cpu"):
            resolve_device("cuda")
    if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        with pytest.raises(RuntimeError, match="MPS"):
            resolve_device("mps")
