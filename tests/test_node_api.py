"""The node daemon's API guards and configuration."""

from __future__ import annotations

import pytest

from sllm_plugin.configfile import ConfigError
from sllm_plugin.store.config import load_config


def test_a_bad_value_is_not_buried_under_the_list_of_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as bad_device:
        load_config(None, devices=["gpu0"], **{"ssd.path": str(tmp_path)})
    assert "invalid device 'gpu0'" in str(bad_device.value)
    assert "valid keys" not in str(bad_device.value)
    with pytest.raises(ConfigError) as unknown:
        load_config(None, devices=["cpu:0"], bogus=1, **{"ssd.path": str(tmp_path)})
    assert "bogus: Extra inputs are not permitted (valid keys here: host, port" in str(
        unknown.value)
    with pytest.raises(ConfigError, match=r"models.org/m.nope: .* \(valid keys here: source, "
                                          r"revision, replica_args\)"):
        load_config(None, models={"org/m": {"source": "x", "nope": 1}},
                    **{"ssd.path": str(tmp_path)})
