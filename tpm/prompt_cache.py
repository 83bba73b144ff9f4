"""Prompt embeddings computed once: a cache in front of :meth:`tpm.backbones.Backbone.encode`.

A GRPO run encodes the same training and evaluation prompts at every iteration, with text encoders
(T5-XXL for Flux and SD3: 9.5 GB in bf16) that do nothing else. :class:`PromptCache` encodes each
prompt once, keeps its rows of the :class:`~tpm.backbones.base.Conditioning` (embeddings, pooled
embeddings, the negative ones under CFG, per-sample extras) on the CPU, and assembles a batch's
conditioning from them; :meth:`PromptCache.free_encoders` then moves the text encoders off the
device. ``tpm.sample`` uses the cache attached to a pipeline (:meth:`PromptCache.attach`).

Entries are keyed by the prompt, its negative prompt, the guidance settings and the maximum sequence
length, under one *encoder key* (the text encoders' classes, names, dtypes, sizes and a checksum of
their first weights), so a cache saved by :meth:`save` (safetensors, one tensor per prompt and part,
with the keys in its metadata) is reused only by the same encoders.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

ATTR = "_tpm_prompt_cache"
PARTS = ("embeds", "pooled", "negative_embeds", "negative_pooled")


class PromptCacheError(ValueError):
    """A prompt the cache cannot encode (its text encoders were freed); the message says what to do."""


def encoder_key(pipe) -> str:
    """Identity of a pipeline's text encoders: class, name, dtype, parameter count and a checksum of the
    first weights of each (cheap; distinguishes two random models of one config)."""
    parts = []
    for name in sorted(getattr(pipe, "components", {})):
        module = pipe.components[name]
        if not name.startswith("text_encoder") or not isinstance(module, torch.nn.Module):
            continue
        params = list(module.parameters())
        first = params[0].detach().flatten()[:4096].double().cpu() if params else torch.zeros(1)
        parts.append([name, type(module).__name__, getattr(module.config, "_name_or_path", ""), str(params[0].dtype)
                      if params else "", sum(p.numel() for p in params), round(float(first.sum()), 6),
                      round(float(first.abs().sum()), 6)])
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def _entry_key(prompt: str, negative: str | None, settings: dict[str, Any]) -> str:
    return json.dumps([prompt, negative, settings], sort_keys=True)


class PromptCache:
    """Conditioning rows per prompt for one pipeline's text encoders (see the module docstring)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.key = encoder_key(pipe)
        self.rows: dict[str, dict[str, torch.Tensor]] = {}  # entry key -> part -> row (CPU)
        self.shared: dict[str, Any] = {}  # entry key -> extras that are not per sample (the same for every batch)
        self.freed = False

    # ---- use ------------------------------------------------------------------------------------
    def attach(self) -> PromptCache:
        """``tpm.sample`` on this pipeline encodes through the cache from now on."""
        setattr(self.pipe, ATTR, self)
        return self

    def detach(self) -> None:
        if getattr(self.pipe, ATTR, None) is self:
            delattr(self.pipe, ATTR)

    def __len__(self) -> int:
        return len(self.rows)

    def encode(self, backbone, prompts: list[str], guidance_scale: float, negative_prompt: list[str] | None = None,
               **kwargs):
        """``backbone.encode(prompts, ...)`` from cached rows, encoding the prompts not cached yet."""
        settings = {"guidance_scale": float(guidance_scale), **{k: v for k, v in kwargs.items()
                                                                 if isinstance(v, (int, float, str, type(None)))}}
        negatives = list(negative_prompt) if negative_prompt is not None else [None] * len(prompts)
        keys = [_entry_key(p, n, settings) for p, n in zip(prompts, negatives)]
        missing = {}
        for k, p, n in zip(keys, prompts, negatives):
            if k not in self.rows:
                missing.setdefault(k, (p, n))
        if missing:
            if self.freed:
                first = next(iter(missing.values()))[0]
                raise PromptCacheError(
                    f"prompt {first!r} is not in the prompt-embedding cache and its text encoders were freed; "
                    "encode every prompt of the run before free_encoders(), or turn the cache off")
            self._add(backbone, list(missing), [p for p, _ in missing.values()],
                      [n for _, n in missing.values()] if negative_prompt is not None else None, guidance_scale, kwargs)
        return self._assemble(backbone, prompts, keys, float(guidance_scale))

    def _add(self, backbone, keys, prompts, negatives, guidance_scale, kwargs) -> None:
        cond = backbone.encode(prompts, guidance_scale, negative_prompt=negatives, **kwargs)
        b = len(prompts)
        per_sample = {k for k, v in cond.extras.items() if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b}
        for i, key in enumerate(keys):
            row = {part: getattr(cond, part)[i].detach().cpu().clone() for part in PARTS
                   if getattr(cond, part) is not None}
            row.update({f"extras.{k}": cond.extras[k][i].detach().cpu().clone() for k in per_sample})
            self.rows[key] = row
            self.shared[key] = {"do_cfg": cond.do_cfg, **{k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                                                           for k, v in cond.extras.items() if k not in per_sample}}

    def _assemble(self, backbone, prompts, keys, guidance_scale):
        from tpm.backbones.base import Conditioning

        device = backbone.device
        rows = [self.rows[k] for k in keys]
        shared = dict(self.shared[keys[0]])
        do_cfg = shared.pop("do_cfg")
        stacked = {name: torch.stack([r[name] for r in rows]).to(device) for name in rows[0]}
        extras = {**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in shared.items()},
                  **{name[len("extras."):]: t for name, t in stacked.items() if name.startswith("extras.")}}
        return Conditioning(prompts=list(prompts), embeds=stacked["embeds"], pooled=stacked["pooled"],
                            guidance_scale=guidance_scale, do_cfg=do_cfg,
                            negative_embeds=stacked.get("negative_embeds"),
                            negative_pooled=stacked.get("negative_pooled"), extras=extras)

    def fill(self, prompts: list[str], batch_size: int = 16, **sample_kwargs) -> int:
        """Encode ``prompts`` (those not cached yet, ``batch_size`` at a time) as ``tpm.sample`` with
        ``sample_kwargs`` will ask for them; returns the number of entries."""
        attached = getattr(self.pipe, ATTR, None)
        setattr(self.pipe, ATTR, self)
        try:
            unique = list(dict.fromkeys(prompts))
            with torch.no_grad():
                for s in range(0, len(unique), batch_size):
                    encode_prompts(self.pipe, unique[s:s + batch_size], **sample_kwargs)
        finally:
            if attached is None:
                delattr(self.pipe, ATTR)
            else:
                setattr(self.pipe, ATTR, attached)
        return len(self)

    # ---- memory ---------------------------------------------------------------------------------
    def free_encoders(self, device: str | torch.device = "cpu") -> list[str]:
        """Move the text encoders to ``device`` (the CPU), where they no longer take device memory; prompts
        not cached by then are refused with :class:`PromptCacheError`. Returns the components moved."""
        moved = []
        for name, module in getattr(self.pipe, "components", {}).items():
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module):
                module.to(device)
                moved.append(name)
        self.freed = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return moved

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """All entries as one safetensors file; keys and shared extras in its metadata (JSON)."""
        from safetensors.torch import save_file

        names = sorted(self.rows)
        tensors = {f"{i}/{part}": t.contiguous() for i, k in enumerate(names) for part, t in self.rows[k].items()}
        shared = [{k: v for k, v in self.shared[name].items() if not isinstance(v, torch.Tensor)} for name in names]
        shared_tensors = {f"{i}/shared.{k}": v.detach().cpu().clone() for i, name in enumerate(names)
                          for k, v in self.shared[name].items() if isinstance(v, torch.Tensor)}
        save_file({**tensors, **shared_tensors}, path, metadata={
            "encoder_key": self.key, "entries": json.dumps(names), "shared": json.dumps(shared)})

    def load(self, path: str) -> int:
        """Add the entries of a file saved by :meth:`save` for the same encoders; returns how many (0 when the
        file was written for other encoders)."""
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata()
            if meta.get("encoder_key") != self.key:
                return 0
            names = json.loads(meta["entries"])
            shared = json.loads(meta["shared"])
            rows: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(names))}
            extras: dict[int, dict[str, Any]] = {i: dict(shared[i]) for i in range(len(names))}
            for t in f.keys():
                head, _, part = t.partition("/")
                if part.startswith("shared."):
                    extras[int(head)][part[len("shared."):]] = f.get_tensor(t)
                else:
                    rows[int(head)][part] = f.get_tensor(t)
            for i, name in enumerate(names):
                self.rows[name], self.shared[name] = rows[i], extras[i]
        return len(names)


def cache_of(pipe) -> PromptCache | None:
    """The cache attached to ``pipe``, if any."""
    return getattr(pipe, ATTR, None)


def conditioning(pipe, backbone, prompts: list[str], guidance_scale, negative_prompt, max_sequence_length,
                 true_cfg_scale):
    """The batch's conditioning as ``tpm.sample`` builds it: through the pipeline's cache when one is
    attached, else from the text encoders."""
    gscale = guidance_scale if guidance_scale is not None else backbone.call_default("guidance_scale")
    if negative_prompt is not None:
        negative_prompt = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negative_prompt) == 1 and len(prompts) > 1:
            negative_prompt = negative_prompt * len(prompts)
    kwargs = dict(negative_prompt=negative_prompt, max_sequence_length=max_sequence_length,
                  true_cfg_scale=true_cfg_scale)
    cache = cache_of(pipe)
    if cache is None:
        return backbone.encode(prompts, gscale, **kwargs)
    return cache.encode(backbone, prompts, gscale, **kwargs)


def encode_prompts(pipe, prompts: list[str], *, guidance_scale: float | None = None,
                   negative_prompt: str | list[str] | None = None, true_cfg_scale: float = 1.0,
                   max_sequence_length: int | None = None, **_ignored):
    """The conditioning ``tpm.sample(pipe, prompts, **same_arguments)`` denoises with (arguments that do not
    concern the prompts are ignored); fills an attached prompt cache."""
    from tpm.backbones import get_backbone

    return conditioning(pipe, get_backbone(pipe), list(prompts), guidance_scale, negative_prompt,
                        max_sequence_length, true_cfg_scale)
