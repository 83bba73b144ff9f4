"""The "testbed" reward: the verifier's score behind the common reward contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rewards
from rewards import RewardError
from tpm.testbed import Verifier, render


def batch(prompts: list[str], size: int = 32) -> torch.Tensor:
    arrs = [np.asarray(render(p, size, seed=i), np.float32) / 255 for i, p in enumerate(prompts)]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


DRAWN = ["a red circle", "two blue squares and a green triangle", "a purple triangle above a cyan circle",
         "a yellow square", "a circle and a triangle"]
ASKED = ["a red circle", "three blue squares and a green triangle", "a purple triangle below a cyan circle",
         "a red square", "a circle and a triangle"]


def test_registered_and_equal_to_the_verifier():
    assert "testbed" in rewards.registered_rewards()
    reward = rewards.load("testbed", batch_size=2)  # several internal batches
    pixels = batch(DRAWN)
    scores = reward(pixels, ASKED)
    expected = [Verifier().verify(pixels[i], p).score for i, p in enumerate(ASKED)]
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert scores.tolist() == pytest.approx(expected)
    # hand count of the failed checks: count (1 of 5), relation (1 of 5), colour (1 of 2)
    assert scores.tolist() == pytest.approx([1.0, 0.8, 0.8, 0.5, 1.0])


def test_all_correct_metric_and_pil_input():
    reward = rewards.load("testbed", metric="all_correct")
    images = [render(p, 64, seed=i) for i, p in enumerate(DRAWN)]
    assert reward(images, ASKED).tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_bad_options_and_prompts_raise_reward_errors():
    with pytest.raises(RewardError, match="unknown metric"):
        rewards.load("testbed", metric="accuracy")
    reward = rewards.load("testbed")
    with pytest.raises(RewardError, match="unknown word 'cat'"):
        reward(batch(["a red circle"]), ["a red cat"])
    with pytest.raises(RewardError, match="verifier size"):
        rewards.load("testbed", size=8)(batch(["a red circle"]), ["a red circle"])
