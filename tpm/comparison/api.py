"""A whole comparison on objects: run the engine, then write the table, summary, grids and plots.

:func:`run_comparison` takes a pipeline, ``{label: Policy}``, ``{label: reward callable}`` and a
prompt list; ``tpm compare`` and :func:`tpm.compare` turn names into those objects (in
:mod:`tpm.app.cli`) and call it. Outputs in ``out``:

- ``results.csv``: one row per image (prompt, seed, policy, steps, every metric, NFE, time);
- ``summary.md``: per policy and metric the mean with a 95 % interval, and the paired
  difference against the first policy with a paired bootstrap interval (AsynDM Table 1 form);
- ``grid.png``: policies in rows, prompts in columns with each prompt's text above its column, the
  first seed (``grid_steps<K>.png`` for further step counts);
- ``reward_vs_steps.png`` when several step counts are given (AsynDM Table 6 style);
- ``fields_<policy>.png``: the time field over the steps of asynchronous policies;
- ``images/`` and ``cache/``: every image and its scores, so an interrupted run resumes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tpm.comparison.protocol import RESAMPLES
from tpm.comparison.report import (
    PolicySummary,
    metric_names,
    summarise,
    summary_markdown,
    write_results_csv,
    write_summary,
)
from tpm.comparison.runner import CompareError, RunSpec, run, unique_slugs


@dataclass
class ComparisonResult:
    rows: list[dict]  # one per image, as in results.csv
    summary: list[PolicySummary]
    files: dict[str, str]  # what was written: results, summary, grid, plots


def write_outputs(out: str, rows: list[dict], spec: RunSpec, policies: list[str], *, num_resamples: int = RESAMPLES,
                  notes: list[str] | None = None, title: str = "Policy comparison") -> ComparisonResult:
    """results.csv, summary.md, grids and plots from the rows of :func:`tpm.comparison.runner.run`."""
    from tpm.comparison import figures

    metrics = metric_names(rows)
    files = {"results": write_results_csv(os.path.join(out, "results.csv"), rows, metrics)}
    reference = (spec.reference_label, spec.reference_steps) if spec.reference_label else None
    summary = summarise(rows, policies, spec.steps, metrics, num_resamples=num_resamples, reference=reference)
    text = summary_markdown(summary, metrics, title=title, notes=notes, num_resamples=num_resamples)
    files["summary"] = write_summary(os.path.join(out, "summary.md"), text)
    for n, k in enumerate(spec.steps):
        name = "grid" if n == 0 else f"grid_steps{k}"
        files[name] = figures.write_grid(os.path.join(out, f"{name}.png"), out, rows, policies, k, spec.seeds[0])
    if len(spec.steps) > 1:
        files["reward_vs_steps"] = figures.write_reward_vs_steps(os.path.join(out, "reward_vs_steps.png"),
                                                                 summary, metrics)
    for label, s in unique_slugs(policies).items():
        src = os.path.join(out, "cache", "fields", f"{s}_steps{spec.steps[0]}.safetensors")
        if os.path.exists(src):
            png = figures.write_field_heatmap(os.path.join(out, f"fields_{s}.png"), src)
            if png:
                files[f"fields_{label}"] = png
    return ComparisonResult(rows, summary, files)


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """A count n (seeds 0..n-1) or an explicit list of seeds, as a list."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise CompareError(f"seeds must be >= 1 (a count) or a list of seeds, got {seeds}")
        return list(range(seeds))
    return list(seeds)


def run_comparison(
    pipe,
    policies: dict[str, object],
    rewards: dict[str, Callable],
    prompts: list[str],
    *,
    out: str | os.PathLike = "outputs/compare",
    seeds: int | Sequence[int] = 4,
    steps: int | Sequence[int] | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_prompts: int = 4,
    heatmap_prompt: int = 0,
    num_resamples: int = RESAMPLES,
    common_noise: bool = False,
    reference_steps: int | None = None,
    model_label: str = "",
    notes: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ComparisonResult:
    """Compare ``policies`` on ``prompts`` with the same seeds; write tables, grids and plots to ``out``.

    ``seeds`` are noise sets of the evaluation protocol (:mod:`tpm.comparison.protocol`): the noise is
    drawn per (prompt, seed) pair, or with ``common_noise`` shared by every prompt of a seed.
    ``steps``: one step count or several (several add ``reward_vs_steps.png``); None = the
    pipeline's default. ``reference_steps``: add the synchronous sampler at that step count as a row
    of every table (the quality a few-step policy aims at). ``model_label`` keeps caches of different models apart. ``overwrite``
    discards a previous comparison's cache in ``out`` instead of resuming it.
    """
    from tpm.backbones import get_backbone
    from tpm.policy import Policy

    if not policies:
        raise CompareError("no policies to compare")
    for label, p in policies.items():
        if not isinstance(p, Policy):
            raise CompareError(f"policy {label!r} is a {type(p).__name__}, not a tpm Policy")
    out = str(out)
    if steps is None:
        try:
            steps = get_backbone(pipe).call_default("num_inference_steps")
        except ValueError as e:  # BackboneError: not a supported pipeline
            raise CompareError(str(e)) from None
    spec = RunSpec(prompts=list(prompts), seeds=seed_list(seeds), steps=[steps] if isinstance(steps, int) else list(steps),
                   guidance_scale=guidance_scale, height=height, width=width, batch_prompts=batch_prompts,
                   heatmap_prompt=heatmap_prompt, model=model_label, common_noise=common_noise,
                   reference_steps=reference_steps)
    if overwrite:
        for sub in ("cache", "images"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    rows = run(pipe, policies, rewards, spec, out, progress=progress)
    return write_outputs(out, rows, spec, list(policies), num_resamples=num_resamples, notes=notes)
