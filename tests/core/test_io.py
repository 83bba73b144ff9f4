"""``tpm.io``: the config.json + model.safetensors directory format shared by policies and the uncertainty head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tpm.io import WEIGHTS_NAME, read_config_and_weights, write_config_and_weights


class _Net(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, 1)


def _read(path):
    return read_config_and_weights(path, lambda cfg: _Net(cfg["width"]), key="kind", kind="net",
                                   hint="save one with write_config_and_weights")


def test_round_trip_and_errors(tmp_path):
    net = _Net(3)
    write_config_and_weights(tmp_path / "a", {"kind": "net", "width": 3}, net)
    again = _read(tmp_path / "a")
    assert not again.training and torch.equal(again.lin.weight, net.lin.weight)
    with pytest.raises(ValueError, match="net directory .* does not exist"):
        _read(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json: it is not an exported net \\(save one with"):
        _read(tmp_path / "empty")
    write_config_and_weights(tmp_path / "b", {"kind": "net", "width": 4}, _Net(4))
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="does not match the 'net' net .*another configuration or backbone"):
        _read(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not be read .*re-export the net"):
        _read(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="has no model.safetensors, but a 'net' net has weights"):
        _read(tmp_path / "a")
