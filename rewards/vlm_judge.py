"""A VLM judge of prompt alignment behind an OpenAI-compatible server: AsynDM's QwenScore as a reward.

``rewards.load("vlm_judge", url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-VL-7B-Instruct")``
asks the served VLM, for each image, the rubric question with the image's prompt filled in, and
parses the integer it answers. The default rubric is AsynDM's alignment question (AsynDM, App. B.4,
in our words): rate from 0 to 9 how well the image matches its text, 0 unrelated and 9 perfectly
aligned, answering with the number alone. The score is the judge's number as is (0-9; AsynDM's
QwenScore is its mean); a composite z-scores it anyway.

``rubric`` is a template with ``{prompt}`` where the prompt goes (filled by plain replacement, so
other braces are kept), or the path of a text file holding one; ``low`` / ``high`` give its scale.
The HTTP side (data URLs, concurrency, timeouts, retries, errors) is :class:`rewards.openai_chat.ChatClient`.

The reply is read by :func:`parse_score`: reasoning in ``<think>`` tags is dropped, then the first
of these that applies gives the score: a JSON object with a ``score``; the last "score: N"; "N/high"
or "N out of high"; the only number in the text. No number, several different ones, or one outside
``[low, high]`` is an unparseable reply: calling the reward raises one error quoting it (a guess
would feed noise into the results without anyone noticing); ``raw_scores``, which GRPO training
uses, returns NaN there instead and logs the reply, so the trainer skips that iteration rather than
dying on one stray answer. A server that cannot be reached or keeps failing raises in both.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch

from rewards.base import RewardError, RewardModel, register_reward
from rewards.openai_chat import API_KEY_ENV, ChatClient, image_data_url, image_message

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"  # AsynDM's judge
DEFAULT_RUBRIC = (
    "Look at the image and read the text it was generated from. How faithfully does the image show "
    "what the text describes? Rate it on a scale from 0 to 9, where 0 means the image has nothing to do "
    "with the text and 9 means it matches the text completely. Reply with a single integer and nothing "
    "else.\nText: {prompt}"
)
PLACEHOLDER = "{prompt}"
logger = logging.getLogger(__name__)

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_SCORE_WORD = re.compile(rf"score\W{{0,4}}(?:is\W{{0,3}})?({_NUMBER})", re.I)
_OUT_OF = re.compile(rf"({_NUMBER})\s*(?:/|out of)\s*({_NUMBER})", re.I)


def parse_score(text: str, low: float = 0, high: float = 9) -> float:
    """The judge's score in a reply (rules in the module docstring); ValueError saying why not."""
    if not isinstance(text, str):
        raise ValueError("the reply has no text")
    text = _THINK.sub(" ", text)
    if "</think>" in text.lower():  # an opening tag in the prompt template, the closing one in the reply
        text = text[text.lower().rindex("</think>") + len("</think>"):]
    text = text.replace("*", " ").strip()
    value = None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
            if isinstance(obj, dict) and isinstance(obj.get("score"), (int, float)):
                value = float(obj["score"])
        except ValueError:
            pass
    if value is None and (found := _SCORE_WORD.findall(text)):
        value = float(found[-1])
    if value is None and (found := _OUT_OF.findall(text)):
        value = float(found[-1][0])
    if value is None:
        numbers = {float(n) for n in re.findall(_NUMBER, text)}
        if not numbers:
            raise ValueError("it contains no number")
        if len(numbers) > 1:
            raise ValueError(f"it contains several numbers {sorted(numbers)} and no 'score: N'")
        value = numbers.pop()
    if not low <= value <= high:
        raise ValueError(f"its score {value:g} is outside the rubric's scale {low:g}-{high:g}")
    return value


def read_rubric(rubric: str) -> str:
    """A rubric template from its text or from a file; it must hold ``{prompt}`` exactly once."""
    if not isinstance(rubric, str) or not rubric.strip():
        raise RewardError("vlm_judge: rubric must be a template text with {prompt}, or the path of a file holding one")
    if PLACEHOLDER not in rubric and os.path.isfile(rubric):
        with open(rubric, encoding="utf-8") as f:
            rubric = f.read()
    n = rubric.count(PLACEHOLDER)
    if n != 1:
        raise RewardError(f"vlm_judge: the rubric must contain {PLACEHOLDER} exactly once (where the image's prompt "
                          f"goes), found it {n} times in {rubric[:120]!r}")
    return rubric


@register_reward("vlm_judge")
class VLMJudge(RewardModel):
    """Options: ``url`` (API base, ``.../v1``), ``model`` (served name), ``rubric`` (template or file),
    ``low`` / ``high`` (the rubric's scale), ``api_key`` (else ``$OPENAI_API_KEY``), ``concurrency``,
    ``timeout``, ``retries``, ``backoff``, ``max_tokens``, ``image_format`` ("png" | "jpeg"); ``batch_size``
    is how many images are encoded and sent per round. ``device`` / ``dtype`` are accepted and unused."""

    def __init__(self, url: str = "http://127.0.0.1:8000/v1", model: str = DEFAULT_MODEL, rubric: str = DEFAULT_RUBRIC,
                 low: float = 0, high: float = 9, api_key: str | None = None, api_key_env: str = API_KEY_ENV,
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 4, backoff: float = 0.5,
                 max_tokens: int = 32, image_format: str = "png", batch_size: int = 64, **kwargs):
        super().__init__(batch_size=batch_size, **kwargs)
        if not float(low) < float(high):
            raise RewardError(f"vlm_judge: low must be below high, got low={low}, high={high}")
        self.rubric = read_rubric(rubric)
        self.low, self.high = float(low), float(high)
        image_data_url(torch.zeros(3, 1, 1), image_format)  # checks the format now, not at the first batch
        self.image_format = image_format
        self.unreadable: list[str] = []  # why each reply of the last call had no score
        self.client = ChatClient(url, model, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
                                 retries=retries, backoff=backoff, concurrency=concurrency, max_tokens=max_tokens,
                                 what="vlm_judge")

    def question(self, prompt: str) -> str:
        return self.rubric.replace(PLACEHOLDER, prompt)

    def _load(self) -> None:
        pass  # nothing local: the model lives on the server

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        conversations = [image_message(image_data_url(img, self.image_format), self.question(p))
                         for img, p in zip(pixels, prompts)]
        replies = self.client.complete(conversations)
        scores = []
        for reply, prompt in zip(replies, prompts):
            try:
                scores.append(parse_score(reply, self.low, self.high))
            except ValueError as e:
                scores.append(float("nan"))
                msg = (f"vlm_judge: cannot read a score in the judge's reply for the image of prompt {prompt!r}: {e}. "
                       f"Reply: {reply[:200]!r}. Make the rubric ask for one number on its scale "
                       f"({self.low:g}-{self.high:g}; set low=/high= if it uses another) or raise max_tokens=")
                self.unreadable.append(msg)
                logger.warning(msg)
        return torch.tensor(scores, dtype=torch.float32)

    @torch.no_grad()
    def raw_scores(self, images, prompts) -> torch.Tensor:
        """Scores with NaN where a reply had no readable score (GRPO then skips the iteration)."""
        self.unreadable = []
        return super().raw_scores(images, prompts)

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        scores = self.raw_scores(images, prompts)
        if self.unreadable:
            extra = f" ({len(self.unreadable) - 1} more replies like it)" if len(self.unreadable) > 1 else ""
            raise RewardError(self.unreadable[0] + extra)
        return scores
