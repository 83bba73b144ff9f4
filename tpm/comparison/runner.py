"""The comparison engine: policies x prompts x seeds x step counts, same noise, cached, resumable.

It takes objects, not names: a diffusers pipeline, a ``{label: Policy}`` dict and a
``{label: reward callable}`` dict (``reward(images, prompts) -> scores``), so ``tpm`` core never
imports ``policies`` or ``rewards``; ``tpm compare`` and :func:`tpm.compare` (in :mod:`tpm.app.cli`)
turn names into those objects.

Same noise: image (prompt i, seed s) starts from the noise the evaluation protocol gives it
(:func:`tpm.comparison.protocol.noise_seed`: a draw per (prompt, seed) pair, or with
``common_noise`` the same noise for every prompt of seed s) whatever the policy, so the policies'
images differ only by the policy, and a training run's evaluation on the same prompts and noise
sets scores the same images. A reward with a ``raw_scores`` method (every ``rewards.RewardModel``)
scores the float images, as in training; any other callable gets PIL images. Work is done in *units*
of (step count, policy, chunk of ``batch_prompts`` prompts x all seeds), one ``tpm.sample``
call each; the chunking depends only on the settings, so a rerun batches exactly as the first
run did and reproduces its images bit for bit.

Cache (under ``out/``): one PNG per image in ``images/<policy>/steps<K>/p<index>_s<seed>.png``,
one JSON line per image in ``cache/results.jsonl`` (appended and fsync-ed when a unit finishes),
the time fields of one representative image per policy in ``cache/fields/``, and
``cache/manifest.json`` with the settings. A rerun with the same settings skips every unit whose
rows are all present; with different settings it stops and says which setting differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tpm.comparison.protocol import noise_seed


class CompareError(ValueError):
    """A comparison that cannot run as asked (bad policy / prompt set / step count / cache)."""


MANIFEST = "manifest.json"
CACHE_ROWS = "results.jsonl"


@dataclass
class RunSpec:
    """What is compared and how images are made (everything that identifies a cached image)."""

    prompts: list[str]
    seeds: list[int]
    steps: list[int]
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_prompts: int = 4  # prompts per tpm.sample call (each with all seeds)
    heatmap_prompt: int = 0  # prompt index whose time fields are plotted (first seed, first step count)
    model: str = ""  # a label of the pipeline, only to keep caches of different models apart
    extra: dict[str, Any] = field(default_factory=dict)
    common_noise: bool = False  # every prompt of seed s from the same noise (protocol.noise_seed)
    reference_steps: int | None = None  # also the synchronous sampler at this step count (a row of each table)

    def __post_init__(self):
        if not self.prompts:
            raise CompareError("no prompts to compare on; the prompt set is empty")
        if not self.seeds:
            raise CompareError("no seeds: give at least one seed (--seeds N or a list)")
        if any((not isinstance(s, (int, np.integer))) or s < 0 for s in self.seeds):
            raise CompareError(f"seeds must be integers >= 0, got {self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"seeds repeat: {self.seeds}")
        if not self.steps:
            raise CompareError("no step counts given")
        for k in self.steps:
            if not isinstance(k, (int, np.integer)) or k < 1:
                raise CompareError(f"a step count must be an integer >= 1, got {k!r} (steps={self.steps})")
        if len(set(self.steps)) != len(self.steps):
            raise CompareError(f"step counts repeat: {self.steps}")
        if self.batch_prompts < 1:
            raise CompareError(f"batch_prompts must be >= 1, got {self.batch_prompts}")
        if not 0 <= self.heatmap_prompt < len(self.prompts):
            raise CompareError(f"heatmap_prompt {self.heatmap_prompt} is not a prompt index (0..{len(self.prompts) - 1})")
        if self.reference_steps is not None and (not isinstance(self.reference_steps, (int, np.integer))
                                                 or self.reference_steps < 1):
            raise CompareError(f"reference_steps must be an integer >= 1, got {self.reference_steps!r}")
        self.seeds = [int(s) for s in self.seeds]
        self.steps = [int(k) for k in self.steps]

    @property
    def reference_label(self) -> str | None:
        """The label of the reference row (the synchronous sampler at ``reference_steps``), or None."""
        return None if self.reference_steps is None else f"synchronous, {self.reference_steps} steps"


def slug(label: str) -> str:
    """A file-system-safe name for a policy label (``outputs/policy`` -> ``outputs_policy``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "policy"


def policy_fingerprint(policy) -> str:
    """Hash of a policy's config and weights: a changed checkpoint must not reuse cached images."""
    h = hashlib.sha1()
    cfg = policy.config_dict() if hasattr(policy, "config_dict") else {"class": type(policy).__name__}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    if isinstance(policy, torch.nn.Module):
        for name, t in sorted(policy.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def manifest_for(spec: RunSpec, policies: dict, rewards: dict) -> dict:
    return {
        "model": spec.model,
        "prompts_sha1": hashlib.sha1("\n".join(spec.prompts).encode()).hexdigest(),
        "num_prompts": len(spec.prompts),
        "seeds": spec.seeds,
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "height": spec.height,
        "width": spec.width,
        "batch_prompts": spec.batch_prompts,
        "heatmap_prompt": spec.heatmap_prompt,
        "policies": {label: policy_fingerprint(p) for label, p in policies.items()},
        "rewards": list(rewards),
        "noise": "common" if spec.common_noise else "per_prompt",
        "reference_steps": spec.reference_steps,
        **({"extra": spec.extra} if spec.extra else {}),
    }


def _check_manifest(cache_dir: str, manifest: dict) -> None:
    path = os.path.join(cache_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise CompareError(
                f"{os.path.dirname(cache_dir)} holds a comparison with different settings ({', '.join(diff)} "
                "differ); use another --out, or --overwrite to discard its cached images and results"
            )
    else:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)


def read_cached_rows(cache_dir: str) -> dict[tuple, dict]:
    """Rows of finished images by key (policy, steps, prompt_index, seed); a torn last line is ignored."""
    rows: dict[tuple, dict] = {}
    path = os.path.join(cache_dir, CACHE_ROWS)
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: its unit is redone
            rows[row_key(r)] = r
    return rows


def row_key(r: dict) -> tuple:
    return (r["policy"], int(r["steps"]), int(r["prompt_index"]), int(r["seed"]))


def _scores(reward: Callable, label: str, images: list, prompts: list[str]) -> np.ndarray:
    s = reward(images, prompts)
    s = s.detach().float().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=np.float64)
    s = s.reshape(-1).astype(np.float64)
    if s.shape[0] != len(images):
        raise CompareError(f"reward {label!r} returned {s.shape[0]} scores for {len(images)} images")
    return s


def _save_fields(path: str, traj, sample: int) -> None:
    from safetensors.torch import save_file

    tensors = {
        "tau": torch.stack([t[sample] for t in traj.tau]).float().contiguous(),
        "tau_cond": torch.stack([t[sample] for t in traj.tau_cond]).float().contiguous(),
        "sigmas": traj.sigmas.float().contiguous(),
    }
    if any(m is not None for m in traj.masks):
        tensors["masks"] = torch.stack(
            [torch.full(traj.grid, float("nan")) if m is None else m[sample].float() for m in traj.masks]
        ).contiguous()
    save_file(tensors, path)


def run(
    pipe,
    policies: dict[str, Any],
    rewards: dict[str, Callable],
    spec: RunSpec,
    out: str | os.PathLike,
    *,
    progress: bool = True,
    sample_fn: Callable | None = None,
) -> list[dict]:
    """Make (or reuse) every image of the comparison and score it; returns the rows, sorted.

    Row: policy, steps, prompt_index, seed, prompt, nfe (denoiser evaluations per image, guidance
    branches and reference runs included), time_s (sampling wall time per image, the unit's time
    over its images), image (path relative to ``out``), and one float per reward.
    ``sample_fn`` defaults to :func:`tpm.sample` (tests may wrap it to count calls).
    """
    _check_inputs(policies, rewards)
    if spec.reference_label is not None:
        if spec.reference_label in policies:
            raise CompareError(f"a policy is labelled {spec.reference_label!r}, the reference row's label; rename it")
        from tpm.policy import Synchronous

        policies = {**policies, spec.reference_label: Synchronous()}
    if sample_fn is None:
        from tpm.sampler import sample as sample_fn
    from tpm.backbones import get_backbone

    try:  # CFG as this pipeline takes it (a Flux without guidance embedding: true CFG, empty negative)
        cfg = get_backbone(pipe).sample_kwargs(spec.guidance_scale)
    except ValueError as e:  # BackboneError: not a supported pipeline
        raise CompareError(str(e)) from None
    out = str(out)
    cache_dir = os.path.join(out, "cache")
    _check_manifest(cache_dir, manifest_for(spec, policies, rewards))
    os.makedirs(os.path.join(cache_dir, "fields"), exist_ok=True)
    done = read_cached_rows(cache_dir)
    slugs = unique_slugs(list(policies))
    chunks = [list(range(i, min(i + spec.batch_prompts, len(spec.prompts))))
              for i in range(0, len(spec.prompts), spec.batch_prompts)]
    units = [(_steps_of(spec, label, k), label, chunk) for k in spec.steps for chunk in chunks for label in policies
             if label != spec.reference_label or k == spec.steps[0]]
    heat_chunk = spec.heatmap_prompt // spec.batch_prompts
    bar = tqdm(units, desc="compare", disable=not progress, unit="batch")
    with open(os.path.join(cache_dir, CACHE_ROWS), "a") as log:
        for k, label, chunk in bar:
            keys = [(label, k, i, s) for i in chunk for s in spec.seeds]
            fields_path = os.path.join(cache_dir, "fields", f"{slugs[label]}_steps{k}.safetensors")
            want_fields = (k == spec.steps[0] and chunk[0] // spec.batch_prompts == heat_chunk
                           and label != spec.reference_label)
            if all(key in done for key in keys) and (not want_fields or os.path.exists(fields_path)):
                continue
            bar.set_postfix_str(f"{label} K={k} prompts {chunk[0]}-{chunk[-1]}")
            prompts = [spec.prompts[i] for i in chunk for _ in spec.seeds]
            gens = [torch.Generator(device="cpu").manual_seed(noise_seed(s, i, spec.common_noise))
                    for i in chunk for s in spec.seeds]
            res, nfe, per_image = _sample_unit(sample_fn, pipe, policies[label], label, k, prompts, gens, spec,
                                               want_fields, cfg)
            pixels = res.images.detach().float().cpu().clamp(0, 1)
            images = _to_pil(pixels)
            if want_fields:
                j = (spec.heatmap_prompt - chunk[0]) * len(spec.seeds)
                _save_fields(fields_path, res.trajectory, j)
            metrics = {name: _scores(fn, name, pixels if hasattr(fn, "raw_scores") else images, prompts)
                       for name, fn in rewards.items()}
            img_dir = os.path.join("images", slugs[label], f"steps{k}")
            rows = _unit_rows(out, img_dir, keys, images, spec, nfe, per_image, metrics)
            done.update(zip(keys, rows, strict=True))
            # Rows of a unit land together, after its images: a killed run redoes the whole unit.
            log.write("".join(json.dumps(row) + "\n" for row in rows))
            log.flush()
            os.fsync(log.fileno())
    return _in_order(done, policies, spec)


def _steps_of(spec: RunSpec, label: str, k: int) -> int:
    """The step count a unit of ``label`` runs at: ``k``, or ``reference_steps`` for the reference row."""
    return spec.reference_steps if label == spec.reference_label else k


def _to_pil(pixels: torch.Tensor) -> list:
    """(N, 3, H, W) floats in [0, 1] -> N RGB PIL images (8-bit, rounded)."""
    from PIL import Image

    arr = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


RESULT_COLUMNS = ("policy", "steps", "prompt_index", "seed", "prompt", "nfe", "time_s", "image")


def _check_inputs(policies: dict[str, Any], rewards: dict[str, Callable]) -> None:
    if not policies:
        raise CompareError("no policies to compare")
    if not rewards:
        raise CompareError("no rewards given: a comparison needs at least one metric")
    reserved = set(RESULT_COLUMNS)
    if reserved & set(rewards):
        raise CompareError(f"reward labels {sorted(reserved & set(rewards))} clash with result columns; rename them")


def _sample_unit(sample_fn, pipe, policy, label: str, k: int, prompts: list[str], gens: list, spec: RunSpec,
                 want_fields: bool, cfg: dict) -> tuple[Any, float, float]:
    """One unit's images: (the sampler's result, denoiser evaluations per image, seconds per image)."""
    last_nfe = [float(k)]  # denoiser evaluations per image, from the sampler's step callback

    def count(step_out):
        last_nfe[0] = float(step_out.nfe)

    t0 = time.perf_counter()
    try:
        res = sample_fn(pipe, prompts, policy=policy, num_inference_steps=k, height=spec.height,
                        width=spec.width, generator=gens, output_type="pt", return_trajectory=want_fields,
                        callback=count, **cfg)
    except ValueError as e:  # PolicyError / BackboneError: the user's policy or settings
        raise CompareError(f"policy {label!r} at {k} steps: {e}") from e
    return res, last_nfe[0], (time.perf_counter() - t0) / len(prompts)


def _unit_rows(out: str, img_dir: str, keys: list[tuple], images: list, spec: RunSpec, nfe: float,
               per_image: float, metrics: dict[str, Any]) -> list[dict]:
    """Save a unit's images under ``out/img_dir`` and return its rows, one per (label, steps, prompt, seed) key."""
    os.makedirs(os.path.join(out, img_dir), exist_ok=True)
    rows = []
    for j, (label, k, i, s) in enumerate(keys):
        rel = os.path.join(img_dir, f"p{i:04d}_s{s}.png")
        images[j].save(os.path.join(out, rel))
        rows.append({"policy": label, "steps": k, "prompt_index": i, "seed": s, "prompt": spec.prompts[i],
                     "nfe": nfe, "time_s": per_image, "image": rel,
                     **{name: float(v[j]) for name, v in metrics.items()}})
    return rows


def _in_order(done: dict[tuple, dict], policies: dict[str, Any], spec: RunSpec) -> list[dict]:
    """The comparison's rows, by steps, policy (as given), prompt and seed (as given)."""
    compared = [label for label in policies if label != spec.reference_label]
    order = {label: n for n, label in enumerate([*compared, spec.reference_label])}
    wanted = [(label, k, i, s) for k in spec.steps for label in compared
              for i in range(len(spec.prompts)) for s in spec.seeds]
    if spec.reference_label:  # after every step count's rows
        wanted += [(spec.reference_label, spec.reference_steps, i, s) for i in range(len(spec.prompts))
                   for s in spec.seeds]
    rows = [done[key] for key in wanted]
    rows.sort(key=lambda r: (r["policy"] == spec.reference_label,
                             spec.steps.index(r["steps"]) if r["policy"] != spec.reference_label else 0,
                             order[r["policy"]], r["prompt_index"], spec.seeds.index(r["seed"])))
    return rows


def unique_slugs(labels: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    used: set[str] = set()
    for label in labels:
        s, n = slug(label), 1
        while s in used:
            n += 1
            s = f"{slug(label)}_{n}"
        used.add(s)
        out[label] = s
    return out
