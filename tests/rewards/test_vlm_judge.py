"""The VLM judge against a loopback chat-completions server whose "VLM" is the testbed verifier."""

from __future__ import annotations

import base64
import io
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.base import RewardError
from rewards.composite import Composite
from rewards.loopback_judge import MODEL, LoopbackJudge, caption
from rewards.openai_chat import ChatClient, image_data_url, image_message, retry_after_seconds
from rewards.vlm_judge import DEFAULT_RUBRIC, VLMJudge, parse_score
from tpm.testbed import Verifier, render

PROMPTS = ["a red circle", "two blue squares", "a red circle left of a blue square", "three green triangles"]
# What each image shows: the first two match their prompts, the last two only partly or not at all.
SHOWN = ["a red circle", "two blue squares", "a red circle right of a blue square", "a yellow square"]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [render(p, 64, seed=3) for p in SHOWN]


@pytest.fixture
def judge():
    with LoopbackJudge() as j:
        yield j


def make(judge_or_url, **kw) -> VLMJudge:
    url = judge_or_url if isinstance(judge_or_url, str) else judge_or_url.url
    kw.setdefault("model", MODEL)
    kw.setdefault("backoff", 0.0)
    return rewards.load("vlm_judge", url=url, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- score parsing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reply,expected", [
    ("7", 7), (" **8**\n", 8), ("Score: 6", 6), ("The score is 5.", 5), ('{"score": 4}', 4), ("6/9", 6),
    ("I would rate it 8 out of 9.", 8), ("<think>between 0 and 9, maybe 3 or 4</think>\n7", 7), ("8.5", 8.5),
    ("0", 0), ("Rating 2, score: 3", 3),
])
def test_parse_score_reads_the_usual_reply_forms(reply, expected):
    assert parse_score(reply, 0, 9) == expected


@pytest.mark.parametrize("reply,why", [
    ("", "no number"), ("It looks fine.", "no number"), ("between 3 and 5", "several numbers"),
    ("10", "outside the rubric's scale"), (None, "no text"),
])
def test_parse_score_refuses_what_it_cannot_read(reply, why):
    with pytest.raises(ValueError, match=why):
        parse_score(reply, 0, 9)


def test_retry_after_header_forms():
    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: go now


# ---- round trip -------------------------------------------------------------------------------------
def test_round_trip_scores_are_the_verifier_on_the_rubric_scale(judge, images):
    reward = make(judge, concurrency=4)
    scores = reward(images, PROMPTS)
    verifier = Verifier()
    expected = [round(verifier.verify(im, p).score * 9) for im, p in zip(images, PROMPTS)]
    assert scores.tolist() == expected
    assert expected[:2] == [9, 9] and expected[3] == 0 and 0 < expected[2] < 9  # the cases mean something
    # requests arrive in any order under concurrency: take the first prompt's
    body = next(r["body"] for r in judge.requests if r["body"]["messages"][0]["content"][1]["text"].endswith(PROMPTS[0]))
    assert body["model"] == MODEL and body["temperature"] == 0.0 and body["max_tokens"] == 32
    (message,) = body["messages"]
    image_part, text_part = message["content"]
    assert text_part == {"type": "text", "text": DEFAULT_RUBRIC.replace("{prompt}", PROMPTS[0])}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(sent), np.asarray(images[0]))  # PNG: the 8-bit image, exactly


def test_tensor_images_travel_as_their_8bit_rounding(judge, images):
    t = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images])
    assert make(judge)(t + 0.4 / 255, PROMPTS).tolist() == make(judge)(images, PROMPTS).tolist()


def test_openai_client_reads_the_loopback_server(judge, images):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=judge.url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.chat.completions.create(
        model=MODEL, messages=image_message(image_data_url(images[0]), DEFAULT_RUBRIC.replace("{prompt}", PROMPTS[0])),
        max_tokens=8, temperature=0.0)
    assert out.choices[0].message.content == "9" and out.object == "chat.completion"


def test_loopback_judge_captions_what_the_verifier_sees(judge, images):
    client = ChatClient(judge.url, MODEL, what="captioner")
    captions = client.complete([image_message(image_data_url(im), "Describe this image.") for im in images])
    assert captions == ["a red circle", "two blue squares", "a blue square and a red circle", "a yellow square"]
    assert caption([]) == "an empty grey background"


# ---- concurrency ------------------------------------------------------------------------------------
@pytest.mark.parametrize("concurrency", [1, 3])
def test_requests_in_flight_are_bounded_and_answers_stay_in_order(images, concurrency):
    with LoopbackJudge(delay=0.05) as judge:
        many = images * 3
        scores = make(judge, concurrency=concurrency)(many, PROMPTS * 3)
        assert 1 <= judge.max_in_flight <= concurrency
        if concurrency == 1:
            assert judge.max_in_flight == 1
        assert scores.tolist() == make(judge)(images, PROMPTS).tolist() * 3


# ---- retries ----------------------------------------------------------------------------------------
def test_429_then_success_honours_retry_after(images):
    with LoopbackJudge(fail_first=[429, 429], retry_after=0.01) as judge:
        reward = make(judge, concurrency=1, retries=3, backoff=1000.0)  # only Retry-After keeps this quick
        assert reward(images[:1], PROMPTS[:1]).tolist() == [9]
        assert [r["status"] for r in judge.requests] == [429, 429, 200]


def test_waits_follow_retry_after_else_doubling_backoff(judge):
    class Recorder:  # stands in for the abort event: records the waits instead of sleeping
        waits: list[float] = []

        def wait(self, t):
            self.waits.append(t)
            return False

        def is_set(self):
            return False

    client = ChatClient(judge.url, MODEL, backoff=0.5, max_backoff=1.5, retries=5)
    for attempt, retry_after, low, high in [(1, None, 0.5, 0.625), (2, None, 1.0, 1.25), (4, None, 1.5, 1.875),
                                            (1, 7.0, 1.5, 1.5), (3, 0.2, 0.2, 0.2)]:
        rec = Recorder()
        rec.waits = []
        client._wait(attempt, retry_after, rec)
        assert low <= rec.waits[0] <= high


def test_5xx_is_retried_then_given_up_with_one_error(images):
    with LoopbackJudge(fail_first=[500, 503]) as judge:
        assert make(judge, retries=3)(images[:1], PROMPTS[:1]).tolist() == [9]
    with LoopbackJudge(fail_first=[502] * 10) as judge:
        with pytest.raises(RewardError, match=r"failed 2 tries \(last: HTTP 502: injected failure\).*lower concurrency"):
            make(judge, retries=2, concurrency=1)(images[:1], PROMPTS[:1])


def test_slow_replies_time_out_with_one_error(images):
    with LoopbackJudge(delay=1.0) as judge:
        with pytest.raises(RewardError, match=r"no reply within timeout=0.2 s.*raise timeout="):
            make(judge, timeout=0.2, retries=2)(images[:2], PROMPTS[:2])


def test_unreachable_port_gives_one_error(images):
    port = free_port()
    with pytest.raises(RewardError, match=rf"could not connect.*Nothing answers there.*vllm serve .* --port {port}"):
        make(f"http://127.0.0.1:{port}/v1", retries=2)(images[:2], PROMPTS[:2])


# ---- bad replies and requests -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["not_json", "no_choices"])
def test_replies_that_are_not_chat_completions(images, mode):
    with LoopbackJudge(reply=mode) as judge:
        with pytest.raises(RewardError, match="not a chat completion.*OpenAI-compatible"):
            make(judge)(images[:2], PROMPTS[:2])


def test_unreadable_reply_raises_when_called_and_is_nan_for_training(images):
    with LoopbackJudge(reply="garbage") as judge:
        reward = make(judge)
        with pytest.raises(RewardError, match=r"cannot read a score .*'a red circle'.*no number.*"
                                              r"I am not able to rate this image.*\(1 more replies"):
            reward(images[:2], PROMPTS[:2])
        assert torch.isnan(reward.raw_scores(images[:2], PROMPTS[:2])).all()


def test_unknown_model_and_wrong_path_say_what_to_pass(judge, images):
    with pytest.raises(RewardError, match=r"HTTP 404: The model `nope` does not exist.*model= \('nope'\)"):
        make(judge, model="nope")(images[:1], PROMPTS[:1])
    with pytest.raises(RewardError, match="HTTP 404.*ending in /v1"):
        make(judge.url.removesuffix("/v1") + "/api")(images[:1], PROMPTS[:1])


def test_api_key_from_option_or_env_and_never_shown(images, monkeypatch):
    with LoopbackJudge(api_key="sk-right") as judge:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(RewardError, match=r"HTTP 401.*set \$OPENAI_API_KEY") as e:
            make(judge, api_key="sk-wrong-123")(images[:1], PROMPTS[:1])
        assert "sk-wrong-123" not in str(e.value) and "sk-wrong-123" not in repr(make(judge, api_key="sk-wrong-123").client)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-right")
        assert make(judge)(images[:1], PROMPTS[:1]).tolist() == [9]
        assert judge.requests[-1]["authorization"] == "Bearer sk-right"


@pytest.mark.parametrize("options,message", [
    ({"url": "127.0.0.1:8000"}, "http\\(s\\) API base"),
    ({"rubric": "Rate this image from 0 to 9."}, "exactly once"),
    ({"concurrency": 0}, "concurrency must be an integer >= 1"),
    ({"timeout": 0}, "timeout must be > 0"),
    ({"image_format": "gif"}, "image_format must be one of"),
    ({"low": 9, "high": 0}, "low must be below high"),
    ({"model": ""}, "model= must name the served model"),
])
def test_bad_options_give_one_error_at_construction(options, message):
    with pytest.raises(RewardError, match=message):
        rewards.load("vlm_judge", **{"url": "http://127.0.0.1:1/v1", **options})


def test_url_without_path_gets_v1_and_rubric_can_be_a_file(tmp_path, judge, images):
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Is this {prompt}? Answer 0 (no) or 1 (yes), as {\"score\": N}.")
    reward = make(judge.url.removesuffix("/v1"), rubric=str(rubric), high=1)
    assert reward.client.url == judge.url
    with LoopbackJudge(rubric=rubric.read_text(), high=1) as yes_no:
        assert make(yes_no.url.removesuffix("/v1"), rubric=str(rubric), high=1)(images, PROMPTS).tolist() == [1, 1, 1, 0]


# ---- as a reward in the composite and in training ------------------------------------------------
def test_composite_with_the_judge_and_the_verifier(judge, images):
    comp = Composite({"vlm_judge": 1.0, "testbed": 1.0}, options={"vlm_judge": {"url": judge.url, "model": MODEL}})
    res = comp(images, PROMPTS)
    verifier = rewards.load("testbed")(images, PROMPTS)
    assert torch.allclose(res.metrics["vlm_judge"], torch.round(verifier * 9))
    assert torch.isfinite(res.total).all() and res.total.argmax() in (0, 1)


@pytest.mark.slow
def test_grpo_iteration_with_the_judge_behind_the_recipe_composite(judge, tmp_path):
    import policies
    from tpm.app.train import RecipeConfig, build_reward
    from tpm.grpo import GRPOConfig, GRPOTrainer
    from tpm.tiny import tiny_flux_pipeline

    cfg = RecipeConfig(rewards={"vlm_judge": 0.5, "testbed": 0.5},
                       reward_options={"vlm_judge": {"url": judge.url, "model": MODEL, "concurrency": 4}})
    reward = build_reward(cfg)
    pipe = tiny_flux_pipeline()
    torch.manual_seed(0)
    policy = policies.TPM.for_pipeline(pipe, width=32, heads=2, layers=2, image_grid=4, text_tokens=2)
    g = GRPOConfig(output_dir=str(tmp_path), max_iterations=1, group_size=2, batch_size=4, rollout_batch_size=4,
                   minibatch_size=2, num_inference_steps=3, height=32, width=32, save_every=1, eval_prompts=0,
                   progress=False)
    trainer = GRPOTrainer(g, policy, pipe, reward, PROMPTS)
    trainer._prepare_output()
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    rec = trainer.train_iteration()
    assert len(judge.requests) == 4  # one request per rollout image, all through the composite
    assert rec["skipped"] == 0.0 and np.isfinite(rec["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in policy.named_parameters())


@pytest.mark.parametrize("spec,options", [
    ("vlm_judge:url=http://127.0.0.1:8011/v1:model=m:concurrency=8",
     {"url": "http://127.0.0.1:8011/v1", "model": "m", "concurrency": 8}),
    ("vlm_judge:model=m:url=https://api.example.com/v1", {"model": "m", "url": "https://api.example.com/v1"}),
    ("vlm_judge:url=http://localhost:timeout=5", {"url": "http://localhost", "timeout": 5}),
])
def test_reward_specs_keep_urls_whole(spec, options):
    from tpm.loading import parse_spec

    assert parse_spec(spec) == ("vlm_judge", [], options)


@pytest.mark.slow
def test_tpm_compare_with_the_judge(judge, tmp_path, capsys):
    import csv

    from tpm.app.cli import main

    spec = f"vlm_judge:url={judge.url}:model={MODEL}"
    main(["compare", "--policies", "synchronous,dm_concave", "--prompts", "testbed:test", "--num-prompts", "2",
          "--seeds", "1", "--steps", "3", "--rewards", f"testbed,{spec}", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 4 and len(judge.requests) == 4
    # The judge is the verifier on the rubric's scale, image by image. It sees the PNG it was sent; compare
    # scores `testbed` on the float image, which can differ from the 8-bit one by a detection at a border.
    verifier = Verifier()
    seen = [verifier.verify(Image.open(tmp_path / r["image"]).convert("RGB"), r["prompt"]).score for r in rows]
    assert [float(r[spec]) for r in rows] == [round(9 * s) for s in seen]
    assert "| `dm_concave` |" in capsys.readouterr().out
