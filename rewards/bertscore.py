"""AsynDM's BERTScore metric: caption the image, then BERTScore between the caption and the prompt.

``rewards.load("bertscore", caption_url="http://127.0.0.1:8000/v1")`` captions each image with a VLM
behind an OpenAI-compatible server (the ``vlm_judge`` client, :class:`rewards.openai_chat.ChatClient`;
AsynDM captions with Qwen2.5-VL-7B-Instruct), or ``captioner=`` a local transformers image-to-text
model (BLIP, GIT: a processor that takes images alone), and scores the caption against the prompt
with BERTScore (Zhang et al. 2020): every token of both texts is embedded by layer ``num_layers`` of
a pretrained encoder, vectors are unit-normalised, and each token is matched to its most similar
token of the other text. Recall averages that best cosine over the prompt's tokens (how much of the
prompt the caption covers), precision over the caption's, F1 is their harmonic mean. AsynDM reports
recall with DeBERTa-xlarge, the default here (``microsoft/deberta-xlarge-mnli``, layer 40, the
layer the BERTScore authors tuned; ``roberta-large`` layer 17 is their English default).

Conventions follow the ``bert-score`` package (0.3.13) so numbers are comparable with it: texts are
encoded with the special tokens, RoBERTa/GPT-2 tokenizers with a prefix space (which the package
asks for in a way transformers 5 ignores; here it is a leading space, as the package meant); [CLS]/[SEP] take part
in the matching but get weight 0 in the averages; no idf weighting (the package's default; idf would
make an image's score depend on the other prompts of its batch); a text with no token but the
special ones scores 0. The test suite checks this file against the package on tiny models.

Written with transformers directly rather than by calling ``bert-score``: the package loads models
only by name through ``AutoModel.from_pretrained`` (no device/dtype control, none of our missing-weights
errors), fails under transformers 5 on tokenizers without ``model_max_length`` (an OverflowError while
truncating), and imports pandas and matplotlib; the computation itself is a few lines. The package's
one batch-dependent quirk is not copied: it pads embeddings and multiplies similarities by the mask,
so a token whose cosines are all negative scores 0 when its partner text was padded; here the max
runs over real tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rewards.base import RewardError, RewardModel, hub_error, register_reward
from rewards.openai_chat import API_KEY_ENV, ChatClient, image_data_url, image_message

DEFAULT_BERT_MODEL = "microsoft/deberta-xlarge-mnli"  # AsynDM: DeBERTa xlarge
DEFAULT_CAPTION_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"  # AsynDM's captioner
DEFAULT_CAPTION_PROMPT = "Describe this image in one sentence."
METRICS = ("recall", "precision", "f1")
_COLUMN = {"precision": 0, "recall": 1, "f1": 2}  # of BERTScorer.score
# Layers the BERTScore authors found best correlated with human judgements (bert-score's table).
LAYERS = {
    "microsoft/deberta-xlarge-mnli": 40, "microsoft/deberta-large-mnli": 18, "microsoft/deberta-base-mnli": 9,
    "roberta-large": 17, "roberta-base": 10, "bert-base-uncased": 9, "distilbert-base-uncased": 5,
}


# ---- BERTScore ---------------------------------------------------------------------------------------
def greedy_match(cand: torch.Tensor, ref: torch.Tensor, cand_w: torch.Tensor, ref_w: torch.Tensor):
    """(precision, recall, f1) of one pair: unit token vectors (m, d) / (n, d), weights (m,) / (n,)."""
    if cand_w.sum() <= 0 or ref_w.sum() <= 0:
        return 0.0, 0.0, 0.0
    sim = cand @ ref.T
    p = float((sim.max(dim=1).values * cand_w).sum() / cand_w.sum())
    r = float((sim.max(dim=0).values * ref_w).sum() / ref_w.sum())
    f = 2 * p * r / (p + r) if p + r != 0 else 0.0
    return p, r, f


class BERTScorer:
    """Token embeddings of a pretrained encoder and the greedy matching of BERTScore.

    ``model``: hub id or local folder (``AutoModel`` / ``AutoTokenizer``); ``num_layers``: the layer
    whose output is used (default from :data:`LAYERS`)."""

    def __init__(self, model: str = DEFAULT_BERT_MODEL, num_layers: int | None = None, device="cpu",
                 dtype=torch.float32, batch_size: int = 64):
        if num_layers is None:
            if model not in LAYERS:
                raise RewardError(f"bertscore: no tuned layer known for {model!r}; pass num_layers= (bert-score's "
                                  f"table gives it for its models; known here: {sorted(LAYERS)})")
            num_layers = LAYERS[model]
        self.source, self.num_layers = model, int(num_layers)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.model = self.tokenizer = None

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            model = AutoModel.from_pretrained(self.source, dtype=self.dtype)
        except (OSError, ValueError) as e:
            raise hub_error("bertscore", self.source, "bert_model", e) from None
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if layers is None:
            raise RewardError(f"bertscore: {self.source!r} is not a BERT-style encoder (no encoder.layer); use a "
                              "BERT, RoBERTa or DeBERTa model")
        if not 1 <= self.num_layers <= len(layers):
            raise RewardError(f"bertscore: num_layers must be in 1..{len(layers)} for {self.source!r}, "
                              f"got {self.num_layers}")
        model.encoder.layer = layers[: self.num_layers]  # the chosen layer's output is the model's output
        self.model = model.to(self.device).eval()

    def encode(self, text: str) -> list[int]:
        from transformers import GPT2Tokenizer, RobertaTokenizer

        tok = self.tokenizer
        text = text.strip()
        if not text:
            return tok.encode("", add_special_tokens=True)  # the special tokens alone
        if isinstance(tok, (GPT2Tokenizer, RobertaTokenizer)):
            # bert-score asks these for add_prefix_space=True, an encode() argument transformers 5 ignores;
            # a leading space is the same thing (and is not doubled by a tokenizer that adds one itself)
            text = " " + text
        # bert-score truncates at model_max_length; an unset one (a huge sentinel) falls back to the positions
        limit = min(tok.model_max_length, getattr(self.model.config, "max_position_embeddings", 512))
        return tok.encode(text, add_special_tokens=True, max_length=limit, truncation=True)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per text: unit token vectors (n, d) float32 and matching weights (n,) (0 on [CLS]/[SEP])."""
        if self.model is None:
            self.load()
        special = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id} - {None}
        pad = self.tokenizer.pad_token_id or 0
        out = []
        for s in range(0, len(texts), self.batch_size):
            ids = [self.encode(t) for t in texts[s:s + self.batch_size]]
            n = max(len(i) for i in ids)
            x = torch.full((len(ids), n), pad, dtype=torch.long)
            mask = torch.zeros(len(ids), n, dtype=torch.long)
            for j, i in enumerate(ids):
                x[j, :len(i)], mask[j, :len(i)] = torch.tensor(i), 1
            h = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device))[0].float().cpu()
            for j, i in enumerate(ids):
                e = h[j, :len(i)]
                w = torch.tensor([0.0 if t in special else 1.0 for t in i])
                out.append((e / e.norm(dim=-1, keepdim=True), w))
        return out

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        """(N, 3): precision, recall, F1 of each candidate against its reference."""
        if len(candidates) != len(references):
            raise RewardError(f"bertscore: {len(candidates)} candidates but {len(references)} references")
        emb = self.embed(list(candidates) + list(references))
        n = len(candidates)
        return torch.tensor([greedy_match(emb[i][0], emb[n + i][0], emb[i][1], emb[n + i][1]) for i in range(n)],
                            dtype=torch.float32).reshape(n, 3)


# ---- captioners ------------------------------------------------------------------------------------
class LocalCaptioner:
    """A transformers image-to-text model (``AutoModelForImageTextToText``) whose processor takes
    images alone (BLIP, GIT); greedy decoding of ``max_new_tokens``. Chat VLMs (Qwen2.5-VL) belong
    behind a server: use ``caption_url=`` for them."""

    def __init__(self, source: str, device="cpu", dtype=torch.float32, max_new_tokens: int = 40):
        self.source, self.device, self.dtype, self.max_new_tokens = source, torch.device(device), dtype, max_new_tokens
        self.model = self.processor = None

    def load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(self.source)
            model = AutoModelForImageTextToText.from_pretrained(self.source, dtype=self.dtype)
        except (OSError, ValueError) as e:
            raise hub_error("bertscore captioner", self.source, "captioner", e) from None
        if getattr(self.processor, "chat_template", None):
            raise RewardError(f"bertscore: {self.source!r} is a chat VLM; serve it (e.g. `vllm serve {self.source}`) "
                              "and pass caption_url= instead of captioner=")
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> list[str]:
        from PIL import Image

        if self.model is None:
            self.load()
        images = [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for p in pixels]
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class EndpointCaptioner:
    """Captions from a VLM behind an OpenAI-compatible server, one request per image."""

    def __init__(self, client: ChatClient, prompt: str = DEFAULT_CAPTION_PROMPT, image_format: str = "png"):
        self.client, self.prompt, self.image_format = client, prompt, image_format

    def __call__(self, pixels: torch.Tensor) -> list[str]:
        replies = self.client.complete([image_message(image_data_url(p, self.image_format), self.prompt)
                                        for p in pixels])
        return [r.strip() for r in replies]


# ---- the reward ------------------------------------------------------------------------------------
@register_reward("bertscore")
class BERTScoreReward(RewardModel):
    """Options: ``caption_url`` (+ ``caption_model``, ``caption_prompt``, ``api_key``, ``concurrency``,
    ``timeout``, ``retries``, ``caption_max_tokens``) or ``captioner`` (local folder / hub id);
    ``bert_model`` (hub id or folder), ``num_layers``, ``metric`` ("recall" as AsynDM, "precision", "f1").
    ``last_captions`` holds the captions of the last call."""

    def __init__(self, caption_url: str | None = None, captioner: str | None = None,
                 caption_model: str = DEFAULT_CAPTION_MODEL, caption_prompt: str = DEFAULT_CAPTION_PROMPT,
                 caption_max_tokens: int = 77, api_key: str | None = None, api_key_env: str = API_KEY_ENV,
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 4, bert_model: str = DEFAULT_BERT_MODEL,
                 num_layers: int | None = None, metric: str = "recall", **kwargs):
        super().__init__(**kwargs)
        if metric not in METRICS:
            raise RewardError(f"bertscore: unknown metric {metric!r}; use one of {list(METRICS)}")
        if (caption_url is None) == (captioner is None):
            raise RewardError("bertscore: pass exactly one of caption_url= (an OpenAI-compatible VLM server, e.g. "
                              "vLLM serving Qwen/Qwen2.5-VL-7B-Instruct) or captioner= (a local image-to-text model "
                              "folder or hub id, e.g. Salesforce/blip-image-captioning-large)")
        if caption_url is not None:
            client = ChatClient(caption_url, caption_model, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
                                retries=retries, concurrency=concurrency, max_tokens=caption_max_tokens,
                                what="bertscore captioner")
            self.captioner = EndpointCaptioner(client, caption_prompt)
        else:
            self.captioner = LocalCaptioner(captioner, self.device, self.dtype)
        self.scorer = BERTScorer(bert_model, num_layers, self.device, self.dtype, self.batch_size)
        self.metric = metric
        self.last_captions: list[str] = []

    def _load(self) -> None:
        self.scorer.load()
        if isinstance(self.captioner, LocalCaptioner):
            self.captioner.load()

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        captions = self.captioner(pixels)
        self.last_captions += captions
        return self.scorer.score(captions, prompts)[:, _COLUMN[self.metric]]

    @torch.no_grad()
    def raw_scores(self, images, prompts) -> torch.Tensor:
        self.last_captions = []
        return super().raw_scores(images, prompts)
