"""Model cards (``README.md`` with Hub metadata) for exported policy folders.

Every ``policy.save_pretrained(dir)`` writes a card: the policy type and its paper, the config,
and how to load and sample. A training run (:mod:`tpm.app.train`) rewrites the cards of the folders
it exports with what travels with a trained policy: the backbone it was trained for, the reward
and its weights, the GRPO config and the held-out results the run printed (synchronous, before,
after, with the prompt set, steps and seeds). ``tpm compare --add-to-card DIR`` (or
:func:`add_comparison`) puts a comparison's ``summary.md`` in a card.

The cards are huggingface_hub :class:`~huggingface_hub.ModelCard` objects with
:class:`~huggingface_hub.ModelCardData` metadata (``library_name: tpm``, tags, ``base_model``
when the backbone is a Hub id, the held-out scores as ``model-index`` entries), so the Hub shows
and indexes them like any other card. The body is written here because no huggingface_hub
template describes a timestep policy. This module knows a policy only through the plain dict of
``Policy.card_info()`` (it does not import :mod:`tpm.policy`, which imports it).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

CARD_NAME = "README.md"
LIBRARY = "tpm"
BEGIN_COMPARISON = "<!-- tpm compare: begin -->"
END_COMPARISON = "<!-- tpm compare: end -->"
_TRAINED_SECTION = "## Training"

__all__ = ["CARD_NAME", "add_comparison", "policy_card", "write_policy_card", "write_run_cards"]


def _is_hub_id(model: str | None) -> bool:
    from tpm.hub import is_repo_id

    return bool(model) and ":" not in model and not os.path.exists(model) and is_repo_id(model)


def policy_card(info: dict[str, Any], *, recipe: dict[str, Any] | None = None, report: dict[str, Any] | None = None,
                run: dict[str, Any] | None = None, note: str | None = None):
    """A :class:`huggingface_hub.ModelCard` for a policy described by ``info`` (``Policy.card_info()``).

    ``recipe``: the training run's config as a dict (``tpm.app.recipe.RecipeConfig``: ``model``,
    ``rewards``, ``reward_options``, ``grpo``, ...); ``report``: its held-out report
    (``report.json``); ``run``: the trainer's ``run.json``; ``note``: a line under the title.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name = info["policy"]
    model = (recipe or {}).get("model")
    tags = ["tpm", "timestep-policy", "diffusers", "text-to-image", f"tpm-policy-{name}"]
    if recipe:
        tags.append("grpo")
    evals = _eval_results(report, name, EvalResult) if report else None
    data = ModelCardData(library_name=LIBRARY, tags=tags, base_model=model if _is_hub_id(model) else None,
                         model_name=f"tpm-{name}" if evals else None, eval_results=evals)
    lines = [f"# `{name}` timestep policy", ""]
    if note:
        lines += [note, ""]
    lines += [f"{info['summary']}", ""]
    if info.get("detail"):
        lines += [f"This policy: {info['detail']}", ""]
    lines += [
              "A *timestep policy* decides, at every denoising step of a diffusers text-to-image pipeline, "
              "how far each image token moves and which time the denoiser is told; the backbone is unchanged. "
              "This folder is a policy exported by the `tpm` library: `config.json` (+ `model.safetensors` "
              "when it has weights) and this card.",
              "", "## Policy", "", "| | |", "|---|---|",
              f"| type | `{name}` (`{info['class']}`) |",
              f"| paper | {info.get('paper') or 'none (a tpm baseline)'} |",
              f"| learned parameters | {info.get('parameters', 0):,} |",
              f"| stochastic (GRPO-trainable) | {'yes' if info.get('stochastic') else 'no'} |",
              "", "Config (`config.json`):", "", "```json", json.dumps(info["config"], indent=2, sort_keys=True),
              "```", ""]
    if recipe:
        lines += _training_section(recipe, run)
    if report:
        lines += _report_section(report, recipe or {})
    lines += _usage_section(name, model, recipe)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n")


def _eval_results(report: dict[str, Any], name: str, EvalResult) -> list:
    out = []
    for label, row in report.get("rows", {}).items():
        if "steps" not in label:  # "policy after training": at the run's step count
            label = f"{label}, {report.get('steps')} steps"
        for metric, value in row.get("mean", {}).items():
            out.append(EvalResult(task_type="text-to-image", dataset_type="tpm-prompts",
                                  dataset_name=str(report.get("prompts")), metric_type=metric,
                                  metric_value=float(value), metric_name=f"{metric} ({label})", verified=False))
    return out


def _training_section(recipe: dict[str, Any], run: dict[str, Any] | None) -> list[str]:
    grpo = dict(recipe.get("grpo") or {})
    rewards = recipe.get("rewards") or {}
    options = recipe.get("reward_options") or {}
    lines = [_TRAINED_SECTION, "", "| | |", "|---|---|",
             f"| backbone trained for | `{recipe.get('model')}` ({recipe.get('dtype', 'float32')}) |",
             "| reward (weight) | " + ", ".join(
                 f"`{r}` ({w:g}{', ' + json.dumps(options[r]) if options.get(r) else ''})"
                 for r, w in rewards.items()) + (" (z-scored, weighted sum: AsyncDiff Eq. 16)" if len(rewards) > 1
                                                  else "") + " |",
             f"| training prompts | `{recipe.get('train_prompts')}` |",
             f"| held-out prompts | `{recipe.get('eval_prompts')}` |",
             f"| steps per image | {grpo.get('num_inference_steps')} |",
             f"| seed | {grpo.get('seed')} |"]
    if recipe.get("warm_start"):
        lines.append(f"| warm start | imitated `{json.dumps(recipe['warm_start'])}` for "
                     f"{recipe.get('warm_start_iterations')} iterations |")
    if run:
        lines.append(f"| iterations run | {run.get('iterations')} |")
        best = run.get("best") or {}
        if best.get("iteration") is not None:
            lines.append(f"| exported | the held-out evaluation of iteration {best['iteration']} with the best "
                         f"reward ({best['score']:.4f}, keep_best) |")
    lines += ["", "GRPO config (`tpm.grpo.GRPOConfig`):", "", "```json",
              json.dumps({k: v for k, v in grpo.items() if k not in ("output_dir", "resume", "overwrite")},
                         indent=2, sort_keys=True), "```", ""]
    return lines


def _report_section(report: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    metrics = list(next(iter(report["rows"].values()))["mean"]) if report.get("rows") else []
    k = report.get("steps")
    lines = ["## Held-out results", "",
             f"As printed by the training run, at {k} steps unless a row says otherwise: "
             f"`{report.get('prompts')}`, {report.get('n')} prompts x {report.get('noise_sets')} noise sets "
             f"(noise sets {_seeds(report)} of `tpm.grpo.evaluation.evaluation_seeds`), the same noise for every "
             "row; policies act deterministically. Differences: paired bootstrap over prompts, 95 %.", "",
             "| method | " + " | ".join([*metrics, *[f"{m} minus synchronous@{k}" for m in metrics]]) + " |",
             "|" + "---|" * (1 + 2 * len(metrics))]
    for label, row in report.get("rows", {}).items():
        diffs = row.get("minus_synchronous", {})
        cells = [f"{row['mean'][m]:.4f}" for m in metrics]
        cells += ["{:+.4f} [{:+.4f}, {:+.4f}]".format(*diffs[m]) if m in diffs else "-" for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sel = report.get("selected") or {}
    if sel.get("iteration") is not None:
        lines += ["", f"The exported policy was selected on these prompts (iteration {sel['iteration']}, keep_best), "
                  "so its row is optimistic: see a comparison on other prompts and seeds for a claim."]
    return [*lines, ""]


def _seeds(report: dict[str, Any]) -> str:
    seeds = report.get("noise_seeds")  # a report that names them; else the trainer's default, sets 0..n-1
    if seeds is None:
        seeds = list(range(int(report.get("noise_sets") or 1)))
    return ", ".join(str(x) for x in seeds)


def _usage_section(name: str, model: str | None, recipe: dict[str, Any] | None) -> list[str]:
    which = "the backbone it was trained for" if model else "any pipeline whose widths match the config"
    model = model or "testbed:flux"
    steps = ((recipe or {}).get("grpo") or {}).get("num_inference_steps") or 4
    if model.startswith("testbed:"):
        load_pipe = ["from tpm.testbed import load_pipeline", "",
                     f"pipe = load_pipeline({model.split(':', 1)[1]!r})  # {which}"]
    else:
        load_pipe = ["from tpm.loading import load_model", "", f"pipe = load_model({model!r})  # {which}"]
    return ["## How to use it", "",
            "```python", "import policies", "import tpm", *load_pipe, "",
            'policy = policies.load("ORG/NAME")  # this repo (revision="..." pins a commit), or the local folder',
            f'out = tpm.sample(pipe, ["a red circle above a blue square"], policy=policy, num_inference_steps={steps},',
            "                 return_trajectory=True)", "out.images[0].save(\"sample.png\")",
            "from tpm.plots import field_strip; field_strip(out.trajectory, \"fields.png\")  # what the policy did",
            "```", "", "From the command line, with tpm installed:", "", "```bash",
            f"tpm sample --model {model} --policy ORG/NAME --steps {steps} "
            "--prompt \"a red circle above a blue square\" --save-fields",
            f"tpm compare --model {model} --policies synchronous,ORG/NAME --steps {steps}",
            "```", "", "`ORG/NAME` is this repository's id; a local folder path works the same. Pushed with "
            "`policy.push_to_hub(\"ORG/NAME\")`.", ""]


# ---- writing ------------------------------------------------------------------------------------------
def write_policy_card(path: str | os.PathLike, info: dict[str, Any], card_text: str | None = None) -> str:
    """``path/README.md``: ``card_text`` (a card the policy was loaded with) or the card of ``info``."""
    target = os.path.join(path, CARD_NAME)
    text = card_text if card_text is not None else str(policy_card(info))
    with open(target, "w") as f:
        f.write(text)
    return target


def write_run_cards(info: dict[str, Any], output_dir: str | os.PathLike, recipe: dict[str, Any],
                    report: dict[str, Any] | None) -> list[str]:
    """The cards of a training run's exported folders: ``policy/`` (with the held-out ``report``) and
    ``policy_last/`` when keep_best exported another iteration. Reads ``run.json`` if present."""
    run = None
    run_file = os.path.join(output_dir, "run.json")
    if os.path.isfile(run_file):
        with open(run_file) as f:
            run = json.load(f)
    report = {k: v for k, v in report.items() if not k.startswith("_")} if report else None
    written = []
    for folder, rep, note in (("policy", report, None),
                              ("policy_last", None, "The policy of the run's last iteration; `policy/` holds the "
                               "one keep_best exported, with the held-out results.")):
        path = os.path.join(output_dir, folder)
        if os.path.isfile(os.path.join(path, "config.json")):
            card = policy_card(info, recipe=recipe, report=rep, run=run, note=note)
            card.save(os.path.join(path, CARD_NAME))
            written.append(os.path.join(path, CARD_NAME))
    return written


def add_comparison(card_dir: str | os.PathLike, compare_dir: str | os.PathLike, heading: str | None = None) -> str:
    """Put ``compare_dir/summary.md`` (a ``tpm compare`` output) into ``card_dir/README.md`` as a
    section; a later call replaces the section it wrote. Returns the card's path."""
    from huggingface_hub import ModelCard

    summary = os.path.join(compare_dir, "summary.md")
    card_path = os.path.join(card_dir, CARD_NAME)
    if not os.path.isfile(summary):
        raise FileNotFoundError(f"{summary} does not exist; run `tpm compare --out {compare_dir}` first")
    if not os.path.isfile(card_path):
        raise FileNotFoundError(f"{card_path} does not exist; {card_dir} is not an exported policy folder "
                                "(export one with policy.save_pretrained)")
    with open(summary) as f:
        body = f.read().strip()
    if body.startswith("# "):  # its title: our heading replaces it
        body = body.partition("\n")[2].strip()
    body = re.sub(r"^(#+) ", r"#\1 ", body, flags=re.M)  # its sections one level down, under ours
    section = "\n".join([BEGIN_COMPARISON, heading or "## Comparison (`tpm compare`)", "",
                         f"`summary.md` of `{os.fspath(compare_dir)}`:", "", body, END_COMPARISON])
    card = ModelCard.load(card_path)
    text = card.text
    if BEGIN_COMPARISON in text and END_COMPARISON in text:
        head, _, rest = text.partition(BEGIN_COMPARISON)
        text = head + section + rest.partition(END_COMPARISON)[2]
    else:
        marker = "## How to use it"
        head, found, tail = text.partition(marker)
        text = (head + section + "\n\n" + found + tail) if found else (text.rstrip() + "\n\n" + section + "\n")
    card.text = text
    card.save(card_path)
    return card_path
