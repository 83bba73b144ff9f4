"""BERTScore between caption and prompt: the maths by hand, against the bert-score package on tiny
encoders built from config, and the two captioners (loopback VLM endpoint, tiny local BLIP)."""

from __future__ import annotations

import pytest
import torch

import rewards
from rewards.base import RewardError
from rewards.bertscore import BERTScorer, LocalCaptioner, greedy_match
from rewards.loopback_judge import MODEL, LoopbackJudge
from tpm.testbed import render

WORDS = ("a an the photo of cat dog red blue car cars on grass sky two three circle circles square squares triangle "
         "triangles green yellow cyan purple left right above below and of empty grey background").split()
CANDS = ["a photo of a red cat", "two blue cars on the grass", "a red circle left of a blue square",
         "three green triangles and a cyan circle", "the sky"]
REFS = ["a cat", "two cars", "a red circle left of a blue square", "three green triangles", "a dog on the grass"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = str(tmp_path_factory.mktemp("tiny_bert"))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)])}
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(folder)
    BertTokenizer(vocab=vocab, model_max_length=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory) -> str:
    """A RoBERTa with a byte-level BPE trained offline on our words; its tokenizer adds the prefix space
    itself, so the bert-score package (whose own request for one transformers 5 ignores) gets it too."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    folder = str(tmp_path_factory.mktemp("tiny_roberta"))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS[i:i + 5]) for i in range(len(WORDS))], vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(folder)
    tok = RobertaTokenizer(vocab=f"{folder}/vocab.json", merges=f"{folder}/merges.txt", model_max_length=64,
                           add_prefix_space=True)
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=70, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    RobertaModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = str(tmp_path_factory.mktemp("tiny_blip"))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *dict.fromkeys(WORDS)])}
    tok = BertTokenizer(vocab=vocab, model_max_length=32, bos_token="[DEC]")
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=32, bos_token_id=5,
                         sep_token_id=3, pad_token_id=0, eos_token_id=3),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64),
        projection_dim=32)
    BlipForConditionalGeneration(cfg).eval().save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(folder)
    return folder


def test_greedy_match_by_hand():
    cand = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # cosines: cand0 vs refs (1, 0, -1), cand1 vs refs (0.6, 0.8, -0.6)
    p, r, f = greedy_match(cand, ref, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert p == pytest.approx((1 + 0.8) / 2)
    assert r == pytest.approx((1 + 0.8) / 2)  # ref2 weighs 0 (a special token)
    assert f == pytest.approx(0.9)
    assert greedy_match(cand, ref, torch.zeros(2), torch.ones(3)) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("encoder", ["tiny_bert", "tiny_roberta"])
def test_matches_the_bert_score_package(encoder, request):
    bert_score = pytest.importorskip("bert_score")
    folder = request.getfixturevalue(encoder)
    P, R, F = bert_score.score(CANDS, REFS, model_type=folder, num_layers=2)
    ours = BERTScorer(folder, num_layers=2, batch_size=2).score(CANDS, REFS)
    # Same float32 maths; the package batches sentences sorted by length, so padding (masked) differs.
    assert torch.allclose(ours, torch.stack([P, R, F], dim=1), atol=1e-6)
    assert ours[2].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)  # identical texts


def test_layer_choice_and_empty_text(tiny_bert):
    two, three = BERTScorer(tiny_bert, num_layers=2), BERTScorer(tiny_bert, num_layers=3)
    assert not torch.allclose(two.score(CANDS, REFS), three.score(CANDS, REFS))
    assert len(two.model.encoder.layer) == 2
    # the package's rule: a text with only the special tokens scores 0
    assert two.score(["", "a cat"], ["a cat", "  "]).tolist() == [[0.0] * 3] * 2


SHOWN = ["a red circle", "two blue squares", "a red circle right of a blue square", "a yellow square"]
PROMPTS = ["a red circle", "two blue squares", "a red circle left of a blue square", "three green triangles"]


def test_reward_with_a_vlm_endpoint_captioner(tiny_bert):
    images = [render(p, 64, seed=3) for p in SHOWN]
    with LoopbackJudge() as judge:
        reward = rewards.load("bertscore", caption_url=judge.url, caption_model=MODEL, bert_model=tiny_bert,
                              num_layers=2, batch_size=3)
        scores = reward(images, PROMPTS)
        captions = reward.last_captions
        texts = [r["body"]["messages"][0]["content"][1]["text"] for r in judge.requests]
    assert captions == ["a red circle", "two blue squares", "a blue square and a red circle", "a yellow square"]
    assert set(texts) == {"Describe this image in one sentence."}
    expected = BERTScorer(tiny_bert, num_layers=2).score(captions, PROMPTS)[:, 1]  # recall, as AsynDM
    assert torch.allclose(scores, expected, atol=1e-6)
    assert scores[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6) and scores[3] < 1


def test_reward_with_a_local_captioner(tiny_bert, tiny_blip):
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    reward = rewards.load("bertscore", captioner=tiny_blip, bert_model=tiny_bert, num_layers=2, metric="f1")
    scores = reward(x, PROMPTS[:3])
    captions = reward.last_captions
    alone = LocalCaptioner(tiny_blip, max_new_tokens=40)
    assert captions == [alone(x[i:i + 1])[0] for i in range(3)] and all(captions)
    assert torch.allclose(scores, BERTScorer(tiny_bert, num_layers=2).score(captions, PROMPTS[:3])[:, 2], atol=1e-6)


def test_reward_spec_on_the_command_line(tiny_bert):
    from tpm.app.cli import resolve_rewards

    spec = f"bertscore:caption_url=http://127.0.0.1:8011/v1:caption_model={MODEL}:bert_model={tiny_bert}:num_layers=2"
    (reward,) = resolve_rewards([spec], testbed_prompts=True).values()
    assert reward.captioner.client.url == "http://127.0.0.1:8011/v1" and reward.scorer.num_layers == 2


@pytest.mark.parametrize("options,message", [
    ({}, "exactly one of caption_url="),
    ({"caption_url": "http://127.0.0.1:1/v1", "captioner": "x"}, "exactly one of caption_url="),
    ({"caption_url": "http://127.0.0.1:1/v1", "metric": "bleu"}, "unknown metric"),
    ({"caption_url": "http://127.0.0.1:1/v1", "bert_model": "someone/encoder"}, "pass num_layers="),
])
def test_bad_options_give_one_error(options, message):
    with pytest.raises(RewardError, match=message):
        rewards.load("bertscore", **options)


def test_missing_weights_and_bad_layers_give_one_error(tmp_path, tiny_bert):
    with pytest.raises(RewardError, match="could not load .*Pass bert_model= a local folder"):
        BERTScorer(str(tmp_path / "nowhere"), num_layers=2).load()
    with pytest.raises(RewardError, match=r"num_layers must be in 1..3"):
        BERTScorer(tiny_bert, num_layers=5).load()
    with pytest.raises(RewardError, match="could not load .*Pass captioner= a local folder"):
        LocalCaptioner(str(tmp_path / "nowhere")).load()
