"""Object-token rule and AsynDM Eq. 7 masks, including on a real tiny pipeline."""

import torch

import policies
import tpm
from policies.masks import attention_mask, find_objects, object_positions
from tpm.tiny import tiny_flux_pipeline


def test_find_objects():
    assert find_objects("a shark riding a bike") == ["shark", "bike"]
    assert find_objects("Two red circles and a blue square on the left.") == ["circles", "square"]
    assert find_objects("an astronaut eating in the city") == ["astronaut", "city"]


def test_object_positions_follow_word_indices():
    # positions 0..5 map to words of "a shark riding a bike" (-1 = special/pad)
    words = [0, 1, 1, 2, 3, 4, -1, -1]
    assert object_positions("a shark riding a bike", words) == [1, 2, 5]
    assert object_positions("a shark riding a bike", words, objects=["bike"]) == [5]


def test_eq7_mask_by_hand():
    a = torch.zeros(1, 3, 2, 2)
    a[0, 1] = torch.tensor([[0.9, 0.1], [0.1, 0.1]])  # mean 0.3 -> only (0, 0)
    a[0, 2] = torch.tensor([[0.2, 0.2], [0.2, 0.6]])  # mean 0.3 -> only (1, 1)
    m = attention_mask(a, [[1, 2]])
    assert m.tolist() == [[[True, False], [False, True]]]
    assert attention_mask(a, [[]]).sum() == 0


def test_cross_attention_mask_from_real_maps():
    pipe = tiny_flux_pipeline()
    out = tpm.sample(pipe, ["a shark riding a bike"], policy=policies.load("asyndm"), num_inference_steps=3,
                     height=32, width=32, generator=torch.Generator().manual_seed(0), return_trajectory=True,
                     output_type="latent")
    tr = out.trajectory
    assert tr.masks[0].all()  # Algorithm 1: all ones before the first map
    for att, mask in zip(tr.attention[:-1], tr.masks[1:]):
        pos = object_positions("a shark riding a bike", tr.text_words[0])
        assert pos, "object tokens must be found in the T5 sequence"
        assert torch.equal(mask, attention_mask(att, [pos]))
