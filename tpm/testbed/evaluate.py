"""Verifier evaluation of a testbed pipeline on a prompt split, per difficulty category.

Each category's prompts are sampled (with replacement, seeded) from the split, generated with
``tpm.sample`` under an optional policy, and scored by :class:`tpm.testbed.Verifier`: the mean
GenEval-style score and the all-correct rate per category, plus their averages over categories.
A ``policy_for(items)`` callable lets callers build a per-batch policy (e.g. inpainting from the
batch's rendered ground truth) without this core module importing ``policies/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["CategoryResult", "evaluate_pipeline"]


@dataclass
class CategoryResult:
    n: int
    score: float  # mean verifier score in [0, 1]
    all_correct: float  # fraction of images with every constraint satisfied
    examples: list[tuple[str, Image.Image, bool]] = field(default_factory=list, repr=False)


def evaluate_pipeline(
    pipe,
    *,
    split: str = "val",
    per_category: int = 64,
    categories: tuple[str, ...] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    policy_for: Callable[[list], object] | None = None,
    sample_kwargs_for: Callable[[list], dict] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, CategoryResult]:
    """Score ``per_category`` generated images per category of ``split``.

    ``policy_for(items) -> Policy | None`` builds the policy for one batch of ``PromptItem``s
    (None: synchronous); ``sample_kwargs_for(items) -> dict`` adds keyword arguments to
    ``tpm.sample`` for that batch. Generators are seeded per batch, so two pipelines or policies
    evaluated with the same arguments see the same prompts and initial noise.
    """
    from tpm.backbones import get_backbone
    from tpm.sampler import sample
    from tpm.testbed.grammar import CATEGORIES
    from tpm.testbed.splits import sample_prompts
    from tpm.testbed.verifier import Verifier

    verifier = Verifier()
    cats = categories or CATEGORIES
    scale = guidance_scale if guidance_scale is not None else getattr(pipe, "tpm_defaults", {}).get("guidance_scale", 1.0)
    cfg_kwargs = get_backbone(pipe).sample_kwargs(scale)  # e.g. true CFG for a Flux without guidance embedding
    results: dict[str, CategoryResult] = {}
    for ci, cat in enumerate(cats):
        items = sample_prompts(per_category, category=cat, split=split, seed=seed + 1000 * ci)
        scores, correct, examples = [], [], []
        batches = range(0, len(items), batch_size)
        for b0 in tqdm(batches, desc=f"eval {cat}", disable=not progress):
            batch = items[b0 : b0 + batch_size]
            prompts = [it.prompt for it in batch]
            gen = torch.Generator().manual_seed(seed * 7919 + 131 * ci + b0)
            kwargs = dict(sample_kwargs_for(batch)) if sample_kwargs_for else {}
            out = sample(
                pipe, prompts, policy=policy_for(batch) if policy_for else None,
                num_inference_steps=num_inference_steps, generator=gen, **{**cfg_kwargs, **kwargs},
            )
            for prompt, image, res in zip(prompts, out.images, verifier.verify_batch(out.images, prompts)):
                scores.append(res.score)
                correct.append(res.all_correct)
                if len(examples) < 8:
                    examples.append((prompt, image, res.all_correct))
        results[cat] = CategoryResult(len(scores), sum(scores) / len(scores), sum(correct) / len(correct), examples)
    return results
