"""``tpm search``: the best fixed table in a training run's action space, found on val prompts.

It reads a run's config as ``tpm train`` does (preset, ``--config``, flags), builds the run's
trainable policy for the model (its action space: the field policy's grid move, conditioning shift
and, if enabled, token offset per step) and searches the best state-free table in it
(:class:`policies.field_table.FieldTable`) by coordinate search (:mod:`tpm.table_search`). Each table
is scored like a training run's evaluation (:func:`tpm.grpo.evaluate`: the run's eval prompts, first
``grpo.eval_prompts`` of them, on the evaluation protocol's noise sets, :mod:`tpm.comparison.protocol`)
by the run's rewards (the weighted raw means, ``keep_best``'s criterion).

The table is written to ``--out`` as a loadable policy (``config.json``, model card), with
``search.json`` / ``search.md`` (every point, the best against the synchronous sampler with a paired
interval). Use it as the report's baseline row (``baselines: {"best searched fixed table": {policy:
DIR}}``) and as a GRPO warm start (``warm_start: {policy: DIR}``). Its scores are on the prompts and
noises it was chosen on, so they are optimistic there, like ``keep_best``'s; claims belong on test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from tpm.app.recipe import RecipeConfig, build_parser, resolve
from tpm.typed_config import ConfigError

DEFAULT_VALUES = {"grid": (-0.6, -0.3, 0.0, 0.3, 0.6, 0.9), "cond": (-0.6, -0.3, 0.0, 0.3, 0.6),
                  "offset": (-0.6, -0.3, 0.0, 0.3, 0.6)}


def coordinates(parts: tuple[str, ...], steps: int) -> list[tuple[str, int]]:
    """The table entries that act: grid moves and offsets of steps 0 .. K-2 (the last step goes to 0), the
    conditioning shift of every step."""
    out = []
    for part in ("grid", "offset", "cond"):
        if part in parts:
            out += [(part, k) for k in range(steps if part == "cond" else steps - 1)]
    return out


def search(cfg: RecipeConfig, out: str, *, noise_sets: int | None = None, first_noise_set: int = 0,
           values: dict[str, tuple[float, ...]] | None = None, grid_passes: int = 2, refine_passes: int = 2,
           progress: bool = True) -> dict[str, Any]:
    """Search, write ``out`` (the table policy, ``search.json``, ``search.md``); returns the search report."""
    from policies.field import FieldConfig
    from policies.field_table import FieldTable
    from tpm.app.build import build_policy, build_reward
    from tpm.backbones import get_backbone
    from tpm.comparison.protocol import paired_difference, rounded
    from tpm.grpo import evaluate
    from tpm.loading import load_model, load_prompts
    from tpm.table_search import coordinate_search

    g = cfg.grpo
    k = g.num_inference_steps
    reward = build_reward(cfg)
    prompts = load_prompts(cfg.eval_prompts, column=cfg.prompt_column, split=cfg.eval_split)[: g.eval_prompts]
    if not prompts:
        raise ConfigError("tpm search needs prompts to score tables on: set eval_prompts and grpo.eval_prompts")
    pipe = load_model(cfg.model, cfg.dtype, **({"lora": cfg.lora} if cfg.lora is not None else {}))
    base = build_policy(cfg, pipe, g.seed)
    if not isinstance(base.config, FieldConfig):
        raise ConfigError(f"tpm search searches the field policy's action space (policy: field); this run's policy "
                          f"is {cfg.policy!r}")
    sample_kwargs = g.sample_kwargs or get_backbone(pipe).sample_kwargs()
    values = {**DEFAULT_VALUES, **(values or {})}
    n_sets = noise_sets or g.eval_noise_sets
    per_prompt: dict[str, np.ndarray] = {}

    def score(table) -> float:
        res = evaluate(pipe, FieldTable.like(base, table), prompts, reward, seed=first_noise_set, noise_sets=n_sets,
                       num_inference_steps=k, height=g.height, width=g.width,
                       rollout_batch_size=g.rollout_batch_size, sample_kwargs=sample_kwargs)
        arrays = {m: np.asarray(v, dtype=np.float64) for m, v in res.metrics.items()}
        # per prompt, keep_best's criterion (the weighted raw scores), so that the interval pairs prompts
        totals = reward.summary(arrays) if reward.summary is not None else sum(arrays.values()) / len(arrays)
        per_prompt[json.dumps(table, sort_keys=True)] = totals
        return float(totals.mean())

    def report(point: dict) -> None:
        if progress:
            print(f"search: {point['stage']:8s} {point['score']:.4f} {point['table']}", file=sys.stderr, flush=True)

    parts = base.config.parts
    start = {part: [0.0] * k for part in parts}  # every d = 0: the synchronous sampler
    result = coordinate_search(score, start, coordinates(parts, k), {p: values[p] for p in parts},
                               grid_passes=grid_passes, refine_passes=refine_passes, report=report)
    policy = FieldTable.like(base, result.best)
    policy.save_pretrained(out)
    best_scores = per_prompt[json.dumps(policy.config.table, sort_keys=True)]
    sync_scores = per_prompt[json.dumps(start, sort_keys=True)]
    summary = {"model": cfg.model, "prompts": cfg.eval_prompts, "n_prompts": len(prompts), "steps": k,
               "noise_sets": list(range(first_noise_set, first_noise_set + n_sets)), "rewards": cfg.rewards,
               "best": result.best, "score": round(result.score, 4), "synchronous": round(result.start_score, 4),
               "minus_synchronous": rounded(paired_difference(best_scores, sync_scores)),
               "evaluations": len(result.points), "points": result.points, "policy": out}
    with open(os.path.join(out, "search.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "search.md"), "w") as f:
        f.write(markdown(summary))
    return summary


def markdown(s: dict[str, Any], top: int = 10) -> str:
    d = s["minus_synchronous"]
    lines = [f"Best fixed table in the field policy's action space: {s['prompts']}, {s['n_prompts']} prompts x noise "
             f"sets {s['noise_sets']}, {s['steps']} steps, {s['evaluations']} tables scored (coordinate search).", "",
             f"Best {s['score']:.4f} against synchronous {s['synchronous']:.4f}: {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] "
             "(paired bootstrap over prompts, 95 %; on the prompts and noises it was chosen on).", "",
             f"Use it: `baselines: {{\"best searched fixed table\": {{policy: {s['policy']}}}}}` in a run's config, or "
             f"`warm_start: {{policy: {s['policy']}}}`; `policies.load({s['policy']!r})`.", "",
             "| table | stage | score |", "|---|---|---|"]
    for p in sorted(s["points"], key=lambda p: -p["score"])[:top]:
        lines.append(f"| {json.dumps(p['table'])} | {p['stage']} | {p['score']:.4f} |")
    return "\n".join(lines) + "\n"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = build_parser("Search the best fixed table in a training run's action space on its eval prompts "
                     "(coordinate search); the run's config is read as by tpm train.", prog="tpm search")
    s = p.add_argument_group("search")
    s.add_argument("--out", required=True, help="folder to write the table policy, search.json and search.md to")
    s.add_argument("--search-noise-sets", type=int, default=None,
                   help="noise sets per prompt (default: grpo.eval_noise_sets)")
    s.add_argument("--first-noise-set", type=int, default=0, help="the first noise set (the protocol's numbering)")
    for part, vals in DEFAULT_VALUES.items():
        s.add_argument(f"--{part}-values", type=_floats, default=vals,
                       help=f"candidate d values of the {part} part in a grid pass (default {','.join(map(str, vals))})")
    s.add_argument("--grid-passes", type=int, default=2, help="passes over the candidate values (stop early "
                                                               "when one does not improve)")
    s.add_argument("--refine-passes", type=int, default=2, help="passes moving each entry by +-step, step halved")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``tpm search ...``; a user error is one line on stderr and exit status 1."""
    from policies import PolicyError
    from rewards import RewardError
    from tpm.loading import LoadError

    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = resolve(args)
        if args.grid_passes < 0 or args.refine_passes < 0:
            raise ConfigError("--grid-passes and --refine-passes must be >= 0")
        if args.search_noise_sets is not None and args.search_noise_sets < 1:
            raise ConfigError(f"--search-noise-sets must be >= 1, got {args.search_noise_sets}")
        values = {part: getattr(args, f"{part}_values") for part in DEFAULT_VALUES}
        summary = search(cfg, args.out, noise_sets=args.search_noise_sets, first_noise_set=args.first_noise_set,
                         values=values, grid_passes=args.grid_passes, refine_passes=args.refine_passes,
                         progress=cfg.grpo.progress)
    except (ConfigError, PolicyError, RewardError, LoadError) as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown(summary), end="")
    return summary
