"""The prompt-embedding cache: rollouts through it equal rollouts that encode, its file round-trips, and a
prompt it cannot encode any more is one clear error."""

from __future__ import annotations

import pytest
import torch

from tpm.grpo import rollout
from tpm.prompt_cache import PromptCache, PromptCacheError, encoder_key
from tpm.tiny import tiny_flux_pipeline

from .conftest import PROMPTS, small_tpm


def test_rollouts_with_the_cache_equal_rollouts_without(tmp_path):
    pipe = tiny_flux_pipeline()  # its own: the cache moves the text encoders
    policy = small_tpm(pipe, gamma=1.0, init_scale=1.0)
    kw = dict(num_inference_steps=3, height=32, width=32, explore=True, action_seeds=[1, 2, 3, 4])
    plain = rollout(pipe, policy, PROMPTS, [5, 6, 7, 8], rollout_batch_size=4, **kw)
    cache = PromptCache(pipe)
    assert cache.fill(PROMPTS + PROMPTS[:1], batch_size=3) == 4  # each prompt once
    cache.attach()
    calls = []
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        module.register_forward_hook(lambda *a: calls.append(1))
    cached = rollout(pipe, policy, PROMPTS, [5, 6, 7, 8], rollout_batch_size=2, **kw)
    assert not calls  # nothing encoded again
    # encoded in other batches than the rollouts': equal up to float rounding
    assert torch.allclose(cached.images, plain.images, atol=1e-5)
    assert torch.allclose(cached.log_probs, plain.log_probs, atol=1e-5)
    for k in plain.static:
        assert torch.allclose(cached.static[k], plain.static[k], atol=1e-5)
    # the file: the same entries for the same encoders, nothing for others
    path = tmp_path / "cache.safetensors"
    cache.save(str(path))
    again = PromptCache(pipe)
    assert again.load(str(path)) == 4 and again.rows.keys() == cache.rows.keys()
    assert all(torch.equal(again.rows[k][p], cache.rows[k][p]) for k in cache.rows for p in cache.rows[k])
    other = tiny_flux_pipeline(seed=1)  # the same config, other random text encoders
    assert encoder_key(other) != encoder_key(pipe) and PromptCache(other).load(str(path)) == 0
    # encoders freed: a new prompt cannot be encoded any more, and says so
    cache.free_encoders()
    with pytest.raises(PromptCacheError, match="'a purple star' is not in the prompt-embedding cache"):
        rollout(pipe, policy, ["a purple star"], [1], **{**kw, "action_seeds": [1]})
    cache.detach()
