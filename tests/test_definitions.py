"""Catalog definition files load into the options an encode run needs, or say what is wrong."""

from __future__ import annotations

import pytest

from nrdata.definitions import load_definition
from nrdata.policies import parse_policy


def test_the_shipped_demo_definition_loads_and_its_policies_parse():
    definition = load_definition("demo")
    assert definition.encoder["name"] == "pixel" and definition.flip is True
    unit = definition.encoder["factor"]
    assert [parse_policy(s, unit=unit).variant for s in definition.policies] == ["native"]


def test_the_shipped_imagenet_definition_reproduces_nits_variants():
    definition = load_definition("imagenet1k")
    assert definition.encoder["name"] == "dc-ae-f32c32" and definition.flip is True
    assert [parse_policy(s, unit=32).variant for s in definition.policies] == ["native", "256", "512"]


def test_unknown_and_broken_definitions_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped: .*demo"):
        load_definition("no-such-catalog")
    broken = tmp_path / "broken.toml"
    broken.write_text("[source]\nkind = 'demo'\n[encoder]\nname = 'pixel'\n")
    with pytest.raises(ValueError, match="variants"):
        load_definition(broken)
    broken.write_text("[source\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_definition(broken)
