"""Saving and loading policies (tpm.policy, policies.load): round trips and one-message errors."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import policies
import tpm.policy
from policies import Synchronous
from tpm.policy import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Action,
    Policy,
    PolicyError,
    register_policy,
    registered_policies,
)


@dataclass
class LinearConfig:
    features: int = 3
    hidden: int = 2


class LinearTestPolicy(Policy):
    """A policy with weights, for the persistence tests only (registered while this module runs)."""

    config_class = LinearConfig

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.proj = nn.Linear(self.config.features, self.config.hidden)

    def act(self, state):
        return Action(tau_next=state.tau)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    # Registered here rather than at import so that other test modules never see it.
    register_policy("test-linear")(LinearTestPolicy)
    yield
    tpm.policy._POLICIES.pop("test-linear", None)


def test_synchronous_round_trip(tmp_path):
    Synchronous().save_pretrained(tmp_path / "sync")
    files = sorted(os.listdir(tmp_path / "sync"))
    assert files == ["README.md", CONFIG_NAME]  # the model card; no weights, no file for them
    with open(tmp_path / "sync" / CONFIG_NAME) as f:
        assert json.load(f) == {"policy": "synchronous"}
    for loaded in (Synchronous.from_pretrained(tmp_path / "sync"), Policy.from_pretrained(tmp_path / "sync"),
                   policies.load(str(tmp_path / "sync"))):
        assert type(loaded) is Synchronous and not loaded.training
    assert type(policies.load("synchronous")) is Synchronous
    assert "synchronous" in policies.available()


def test_weighted_round_trip(tmp_path):
    torch.manual_seed(0)
    pol = LinearTestPolicy(features=5, hidden=4)
    pol.save_pretrained(tmp_path / "lin")
    assert sorted(os.listdir(tmp_path / "lin")) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    for loaded in (LinearTestPolicy.from_pretrained(tmp_path / "lin"), policies.load(str(tmp_path / "lin"))):
        assert isinstance(loaded, LinearTestPolicy)
        assert loaded.config == LinearConfig(features=5, hidden=4)
        for k, v in pol.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v)
    # by registered name, with constructor options
    built = policies.load("test-linear", features=6)
    assert built.proj.in_features == 6


def test_unknown_name_lists_valid_names():
    with pytest.raises(PolicyError) as e:
        policies.load("no-such-policy")
    msg = str(e.value)
    assert "no-such-policy" in msg and "synchronous" in msg and "test-linear" in msg
    with pytest.raises(PolicyError, match="no variant"):
        policies.load("synchronous:wiggly")


def test_bad_constructor_options_name_the_valid_ones():
    with pytest.raises(PolicyError, match=r"Valid options: \['features', 'hidden'\]"):
        LinearTestPolicy(width=3)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    for load in (policies.load, Policy.from_pretrained):
        with pytest.raises(PolicyError, match=f"has no {CONFIG_NAME}.*save_pretrained"):
            load(str(tmp_path / "empty"))
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.from_pretrained(tmp_path / "missing")


def test_bad_config_files(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / CONFIG_NAME).write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        policies.load(str(d))
    (d / CONFIG_NAME).write_text(json.dumps({"features": 3}))
    with pytest.raises(PolicyError, match="no 'policy' key"):
        policies.load(str(d))
    (d / CONFIG_NAME).write_text(json.dumps({"policy": "test-linear", "width": 3}))
    with pytest.raises(PolicyError, match=r"unknown keys \['width'\]"):
        Policy.from_pretrained(d)


def test_unregistered_policy_in_config(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / CONFIG_NAME).write_text(json.dumps({"policy": "from-the-future"}))
    for load in (policies.load, Policy.from_pretrained):
        with pytest.raises(PolicyError, match="'from-the-future'.*not registered.*synchronous"):
            load(str(d))


def test_wrong_class_for_directory(tmp_path):
    Synchronous().save_pretrained(tmp_path / "sync")
    with pytest.raises(PolicyError, match="holds a 'synchronous' policy"):
        LinearTestPolicy.from_pretrained(tmp_path / "sync")


def test_options_with_a_directory(tmp_path):
    Synchronous().save_pretrained(tmp_path / "sync")
    with pytest.raises(PolicyError, match="options cannot be combined"):
        policies.load(str(tmp_path / "sync"), gamma=2)


def test_missing_corrupt_and_mismatched_weights(tmp_path):
    d = tmp_path / "lin"
    LinearTestPolicy(features=3, hidden=2).save_pretrained(d)
    weights = d / WEIGHTS_NAME

    # corrupt file
    good = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PolicyError, match=f"{WEIGHTS_NAME} could not be read.*re-export"):
        policies.load(str(d))
    weights.write_bytes(good)
    assert isinstance(policies.load(str(d)), LinearTestPolicy)

    # config edited after export: shapes no longer match
    cfg = json.loads((d / CONFIG_NAME).read_text())
    (d / CONFIG_NAME).write_text(json.dumps({**cfg, "hidden": 7}))
    with pytest.raises(PolicyError, match=r"does not match.*shape mismatches.*proj.weight"):
        policies.load(str(d))

    # weights from another policy: keys missing
    from safetensors.torch import save_file

    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    save_file({"other.weight": torch.zeros(2, 3)}, str(weights))
    with pytest.raises(PolicyError, match=r"missing \['proj.bias', 'proj.weight'\]"):
        policies.load(str(d))

    # no weights file at all
    weights.unlink()
    with pytest.raises(PolicyError, match=f"has no {WEIGHTS_NAME}"):
        policies.load(str(d))


def test_registering_a_name_twice_is_refused():
    assert registered_policies()["test-linear"] is LinearTestPolicy
    with pytest.raises(PolicyError, match="registered twice"):
        @register_policy("test-linear")
        class Other(LinearTestPolicy):
            pass
    assert registered_policies()["test-linear"] is LinearTestPolicy
