"""config.json read back: the envelope, and each config value checked against its field's type."""

import dataclasses
import json
from typing import Any, ClassVar

import pytest

from moekit import MixtureOfExperts, save_model
from moekit.exceptions import DataError
from moekit.io.header import CONFIG_FILE, config_from_dict, read_header, size_fields
from moekit.nn.experts import ExpertConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int
    rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner
    name: str = "x"
    limit: int | None = None
    flag: bool = True
    added: int = 7  # a field that folders saved before it lack

    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {"added": 0}


def test_values_are_checked_and_nested_configs_rebuilt():
    config = config_from_dict(Outer, {"inner": {"size": 3, "rate": 1}, "limit": None})
    assert config == Outer(Inner(3, 1.0), limit=None, added=0)
    assert isinstance(config.inner.rate, float)  # an integer stands for a float, stored as one


def test_a_missing_field_takes_its_legacy_default_else_its_default():
    assert config_from_dict(Outer, {"inner": {"size": 1}}).added == 0
    assert config_from_dict(Outer, {"inner": {"size": 1}, "added": 5}).added == 5
    assert config_from_dict(Outer, {"inner": {"size": 1}}).flag is True


@pytest.mark.parametrize("data, message", [
    ({"inner": {"size": 1}, "limit": "3"}, r'config\.limit must be an integer or null; got "3"'),
    ({"inner": {"size": 1}, "flag": 0}, r"config\.flag must be true or false; got 0"),
    ({"inner": {"size": 1.5}}, r"config\.inner\.size must be an integer; got 1\.5"),
    ({"inner": {"size": 1, "rate": float("nan")}},
     r"config\.inner\.rate must be a finite number; got NaN \(not a finite number\)"),
    ({"inner": []}, r"config\.inner \(Inner\) must be a JSON object; got \[\] \(a list\)"),
    ({}, r"config\.inner is missing \(Outer needs it\)"),
    ({"inner": {"size": 2**63}}, r"config\.inner\.size must be an integer below 2\*\*63"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_its_field(data, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(Outer, data)


def test_the_dataclass_checks_its_own_ranges_after_the_types():
    with pytest.raises(ValueError, match=r"config: ExpertConfig: hidden must be an integer >= 1; "
                                         "got hidden=0"):
        config_from_dict(ExpertConfig, {"hidden": 0})


def test_size_fields_lists_every_integer_dotted():
    assert size_fields(Outer(Inner(3), limit=9)) == {"inner.size": 3, "limit": 9, "added": 7}


def test_read_header_fills_missing_metadata_and_refuses_other_kinds(tmp_path):
    save_model(MixtureOfExperts(2, 1, 3), tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    del header["metadata"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(header))
    assert read_header(tmp_path)["metadata"] == {}
    header["config"] = "n_experts=3"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(header))
    with pytest.raises(DataError, match=r"config must be a JSON object; got \"n_experts=3\""):
        read_header(tmp_path)
