"""Compare timestep policies on one prompt set with the same seeds (SPEC §5; ``tpm compare``).

:func:`compare` is the Python twin of the ``tpm compare`` command: same arguments, same outputs
in ``out``:

- ``results.csv``: one row per image (prompt, seed, policy, steps, every metric, NFE, time);
- ``summary.md``: per policy and metric the mean with a 95 % interval, and the paired
  difference against the first policy with a paired bootstrap interval (AsynDM Table 1 form);
- ``grid.png``: prompts in rows, policies in columns, same seed (``grid_steps<K>.png`` for
  further step counts);
- ``reward_vs_steps.png`` when several step counts are given (AsynDM Table 6 style);
- ``fields_<policy>.png``: the time field over the steps of asynchronous policies;
- ``images/`` and ``cache/``: every image and its scores, so an interrupted run resumes.

Pieces: :mod:`~tpm.comparison.prompts` (prompt sets), :mod:`~tpm.comparison.runner` (the engine, on
objects), :mod:`~tpm.comparison.stats` (intervals), :mod:`~tpm.comparison.report` and
:mod:`~tpm.comparison.figures` (outputs). Only :func:`compare` turns names into policies, rewards
and pipelines; it imports ``policies`` / ``rewards`` inside the function, so ``tpm`` core keeps
not depending on them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tpm.comparison.prompts import PromptSetError, available_sets, load_prompts
from tpm.comparison.report import (
    PolicySummary,
    metric_names,
    summarise,
    summary_markdown,
    write_results_csv,
    write_summary,
)
from tpm.comparison.runner import CompareError, RunSpec, run
from tpm.comparison.stats import Interval, bootstrap_mean, paired_bootstrap

DEFAULT_POLICIES = ("synchronous", "asyndm", "dm_concave")
DEFAULT_PROMPTS = "testbed-val"
# The verifier twice: the fraction of constraints met, and whether all are (GenEval-style accuracy).
TESTBED_REWARDS = {"verifier": ("testbed", {}), "verifier_all_correct": ("testbed", {"metric": "all_correct"})}


@dataclass
class ComparisonResult:
    rows: list[dict]  # one per image, as in results.csv
    summary: list[PolicySummary]
    files: dict[str, str]  # what was written: results, summary, grid, plots


def write_outputs(out: str, rows: list[dict], spec: RunSpec, policies: list[str], *, num_resamples: int = 10_000,
                  notes: list[str] | None = None, title: str = "Policy comparison") -> ComparisonResult:
    """results.csv, summary.md, grids and plots from the rows of :func:`tpm.comparison.runner.run`."""
    from tpm.comparison import figures
    from tpm.comparison.runner import _unique_slugs

    metrics = metric_names(rows)
    files = {"results": write_results_csv(os.path.join(out, "results.csv"), rows, metrics)}
    summary = summarise(rows, policies, spec.steps, metrics, num_resamples=num_resamples)
    text = summary_markdown(summary, metrics, title=title, notes=notes, num_resamples=num_resamples)
    files["summary"] = write_summary(os.path.join(out, "summary.md"), text)
    for n, k in enumerate(spec.steps):
        name = "grid" if n == 0 else f"grid_steps{k}"
        files[name] = figures.write_grid(os.path.join(out, f"{name}.png"), out, rows, policies, k, spec.seeds[0])
    if len(spec.steps) > 1:
        files["reward_vs_steps"] = figures.write_reward_vs_steps(os.path.join(out, "reward_vs_steps.png"),
                                                                 summary, metrics)
    for label, s in _unique_slugs(policies).items():
        src = os.path.join(out, "cache", "fields", f"{s}_steps{spec.steps[0]}.safetensors")
        if os.path.exists(src):
            png = figures.write_field_heatmap(os.path.join(out, f"fields_{s}.png"), src)
            if png:
                files[f"fields_{label}"] = png
    return ComparisonResult(rows, summary, files)


def _parse_reward(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value:key=value`` (values parsed as int / float / bool when they look so)."""
    name, *opts = spec.split(":")
    kwargs: dict[str, Any] = {}
    for o in opts:
        key, eq, val = o.partition("=")
        if not eq or not key:
            raise CompareError(f"reward option {o!r} in {spec!r} must be key=value")
        kwargs[key] = _literal(val)
    return name, kwargs


def _literal(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _as_list(x) -> list:
    if isinstance(x, str):
        return [s.strip() for s in x.split(",") if s.strip()]
    if x is None:
        return []
    return list(x)


def compare(
    policies: str | Sequence | dict = DEFAULT_POLICIES,
    prompts: str | Sequence[str] = DEFAULT_PROMPTS,
    *,
    rewards: str | Sequence | dict | None = None,
    model: Any = None,
    out: str | os.PathLike = "outputs/compare",
    num_prompts: int | None = 64,
    seeds: int | Sequence[int] = 4,
    steps: int | Sequence[int] | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_prompts: int = 4,
    prompt_column: str | None = None,
    prompt_split: str = "train",
    prompt_seed: int = 0,
    heatmap_prompt: int = 0,
    num_resamples: int = 10_000,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ComparisonResult:
    """Compare policies on a prompt set with the same seeds; write tables, grids and plots to ``out``.

    Args:
        policies: names (``"synchronous"``, ``"asyndm:piecewise_linear"``...), exported policy
            directories, Policy objects, or a ``{label: Policy}`` dict; a comma-separated string works.
            The first is the reference of the paired differences.
        prompts: a prompt set name (``available_sets()``), ``NAME=FILE_OR_HUB_ID``, a file, a hub id,
            or a list of prompt strings.
        rewards: reward names (``name`` or ``name:key=value``), callables ``(images, prompts) -> scores``
            or a ``{label: callable}`` dict. Default: the testbed verifier (score and all-correct) for
            testbed prompts; other prompt sets need rewards named.
        model: a diffusers pipeline, or what ``tpm sample --model`` takes (path / hub id,
            ``testbed:flux``, ``tiny:flux``); default: the shipped testbed Flux (random tiny Flux
            if it is not there yet).
        num_prompts: seeded subset size (None = all); seeds: a count n (seeds 0..n-1) or a list.
        steps: one step count or several (several add ``reward_vs_steps.png``); None = the
            pipeline's default.
        batch_prompts: prompts per sampling call (each with all its seeds).
        overwrite: discard a previous comparison's cache in ``out`` instead of resuming it.
    """
    import policies as policy_lib
    import rewards as reward_lib
    from tpm.policy import Policy

    out = str(out)
    # Policies: names -> objects, labels kept as the user wrote them.
    if isinstance(policies, dict):
        pol = dict(policies)
    else:
        pol = {}
        for p in _as_list(policies):
            label = p if isinstance(p, str) else getattr(p, "policy_name", None) or type(p).__name__
            if label in pol:
                raise CompareError(f"policy {label!r} is listed twice")
            if isinstance(p, str):
                try:
                    pol[label] = policy_lib.load(p)
                except (policy_lib.PolicyError, FileNotFoundError) as e:
                    raise CompareError(f"policy {p!r}: {e}\nvalid names: {', '.join(policy_lib.available())}, "
                                       "or an exported policy directory (with config.json)") from None
            else:
                pol[label] = p
    if not pol:
        raise CompareError(f"no policies given; valid names: {', '.join(policy_lib.available())}")
    for label, p in pol.items():
        if not isinstance(p, Policy):
            raise CompareError(f"policy {label!r} is a {type(p).__name__}, not a tpm Policy")

    # Prompts.
    if isinstance(prompts, str):
        prompt_list = load_prompts(prompts, num_prompts, prompt_seed, prompt_column, prompt_split)
        prompt_label = prompts
    else:
        prompt_list = [str(p) for p in prompts]
        if not prompt_list:
            raise CompareError("the prompt list is empty")
        from tpm.comparison.prompts import subset

        prompt_list = subset(prompt_list, num_prompts, prompt_seed)
        prompt_label = f"{len(prompt_list)} given prompts"
    testbed_prompts = isinstance(prompts, str) and prompts.startswith("testbed-")

    # Rewards.
    if rewards is None:
        if not testbed_prompts:
            raise CompareError("give rewards for this prompt set (e.g. rewards='clipscore'); registered: "
                               f"{', '.join(sorted(reward_lib.registered_rewards()))}")
        rewards = {label: reward_lib.load(name, **kw) for label, (name, kw) in TESTBED_REWARDS.items()}
    if isinstance(rewards, dict):
        rew = dict(rewards)
    else:
        rew = {}
        for r in _as_list(rewards):
            if isinstance(r, str):
                name, kwargs = _parse_reward(r)
                try:
                    rew[r] = reward_lib.load(name, **kwargs)
                except reward_lib.RewardError as e:
                    raise CompareError(str(e)) from None
            elif callable(r):
                rew[getattr(r, "name", None) or type(r).__name__] = r
            else:
                raise CompareError(f"reward {r!r} is neither a name nor a callable")

    # Seeds and steps (validated by RunSpec).
    if isinstance(seeds, int):
        if seeds < 1:
            raise CompareError(f"seeds must be >= 1 (a count) or a list of seeds, got {seeds}")
        seed_list = list(range(seeds))
    else:
        seed_list = list(seeds)
    pipe, model_label = _pipeline(model, device)
    if steps is None:
        from tpm.backbones import get_backbone

        steps = get_backbone(pipe).call_default("num_inference_steps")
    step_list = [steps] if isinstance(steps, int) else list(steps)
    if model_label.startswith("tiny:") and height is None and width is None:
        height = width = 32  # random tiny models: keep the images (and the run) small
    spec = RunSpec(prompts=prompt_list, seeds=seed_list, steps=step_list, guidance_scale=guidance_scale,
                   height=height, width=width, batch_prompts=batch_prompts, heatmap_prompt=heatmap_prompt,
                   model=model_label)
    if overwrite:
        for sub in ("cache", "images"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    rows = run(pipe, pol, rew, spec, out, progress=progress)
    notes = [f"model: `{model_label}`; prompts: `{prompt_label}` ({len(prompt_list)} prompts, seed "
             f"{prompt_seed}); seeds: {seed_list if len(seed_list) <= 8 else f'{len(seed_list)} seeds'}; "
             f"guidance: {guidance_scale if guidance_scale is not None else 'pipeline default'}"]
    return write_outputs(out, rows, spec, list(pol), num_resamples=num_resamples, notes=notes)


def _pipeline(model: Any, device: str | None):
    if model is not None and not isinstance(model, str):
        if device:
            model = model.to(device)
        return model, str(getattr(model, "name_or_path", None) or type(model).__name__)
    from tpm.cli import _default_model, load_model

    label = model or _default_model()
    return load_model(label, device), label


__all__ = [
    "CompareError", "ComparisonResult", "Interval", "PolicySummary", "PromptSetError", "RunSpec",
    "available_sets", "bootstrap_mean", "compare", "load_prompts", "paired_bootstrap", "run", "write_outputs",
]
