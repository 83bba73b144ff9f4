"""``tpm`` command line (``tpm sample``, ``tpm compare``, ``tpm export-scheduler``, ``tpm train``,
``tpm search``, ``tpm reward-serve``) and :func:`compare`.

Part of :mod:`tpm.app`, the layer that imports ``policies`` and ``rewards`` (they import ``tpm``,
so the core cannot): it turns policy and reward names into objects, for the commands and for
:func:`compare`, the Python twin of ``tpm compare``. Models and prompt sets are resolved by
:mod:`tpm.loading`. Functions here raise; only :func:`main` turns a user error into one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from tpm.loading import (
    default_model,
    load_model,
    load_prompts,
    subset,
    testbed_domain,
)

DEFAULT_POLICIES = ("synchronous", "asyndm", "dm_concave")
DEFAULT_PROMPTS = "testbed:val"
# The verifier twice: the fraction of constraints met, and whether all are (GenEval-style accuracy).
TESTBED_REWARDS = {
    "shapes": {"verifier": "testbed", "verifier_all_correct": "testbed:metric=all_correct"},
    "spatial": {"verifier": "testbed_spatial", "verifier_all_correct": "testbed_spatial:metric=all_correct",
                "fidelity": "testbed_fidelity"},
}


class CLIError(ValueError):
    """Command-line arguments that do not go together."""


# ---- names -> objects ----------------------------------------------------------------------------
def _as_list(x) -> list:
    if isinstance(x, str):
        return [s.strip() for s in x.split(",") if s.strip()]
    if x is None:
        return []
    return list(x)


def resolve_policies(specs: str | Sequence | dict) -> dict[str, Any]:
    """``{label: Policy}`` from names, exported directories or Policy objects (or a comma-separated
    string of names); labels are the names as written. Raises :class:`CompareError`."""
    import policies as policy_lib
    from tpm.comparison import CompareError

    if isinstance(specs, dict):
        pol = dict(specs)
    else:
        pol = {}
        for p in _as_list(specs):
            label = p if isinstance(p, str) else getattr(p, "policy_name", None) or type(p).__name__
            if label in pol:
                raise CompareError(f"policy {label!r} is listed twice")
            if isinstance(p, str):
                try:
                    pol[label] = policy_lib.load(p)
                except (policy_lib.PolicyError, FileNotFoundError) as e:
                    raise CompareError(f"policy {p!r}: {e}\nvalid names: {', '.join(policy_lib.available())}, "
                                       "an exported policy directory (with config.json) or a Hub repo id") from None
            else:
                pol[label] = p
    if not pol:
        raise CompareError(f"no policies given; valid names: {', '.join(policy_lib.available())}")
    return pol


def resolve_rewards(specs: str | Sequence | dict | None, testbed_prompts: bool | str) -> dict[str, Any]:
    """``{label: reward callable}`` from names (``name:key=value``), callables or a dict; ``None`` is
    the testbed verifier (and, for the spatial testbed's prompts, its fidelity score), which only
    testbed prompts can use: ``testbed_prompts`` is their domain ("shapes" / "spatial"; True means
    "shapes") or False. Raises :class:`CompareError`."""
    import rewards as reward_lib
    from tpm.comparison import CompareError

    if specs is None:
        if not testbed_prompts:
            raise CompareError("give rewards for this prompt set (e.g. rewards='clipscore'); registered: "
                               f"{', '.join(sorted(reward_lib.registered_rewards()))}")
        domain = "shapes" if testbed_prompts is True else testbed_prompts
        return {label: reward_lib.load(spec) for label, spec in TESTBED_REWARDS[domain].items()}
    if isinstance(specs, dict):
        return dict(specs)
    rew = {}
    for r in _as_list(specs):
        if isinstance(r, str):
            try:
                rew[r] = reward_lib.load(r)
            except reward_lib.RewardError as e:
                raise CompareError(str(e)) from None
        elif callable(r):
            rew[getattr(r, "name", None) or type(r).__name__] = r
        else:
            raise CompareError(f"reward {r!r} is neither a name nor a callable")
    return rew


def _pipeline(model: Any, device: str | None, lora=None):
    """(pipeline, label) from a pipeline object or a model spec (:func:`tpm.loading.load_model`),
    with LoRA adapters ``lora`` loaded (:func:`tpm.loading.load_lora`)."""
    if model is not None and not isinstance(model, str):
        from tpm.loading import load_lora

        model = load_lora(model, lora) if lora else model
        if device:
            model = model.to(device)
        return model, str(getattr(model, "name_or_path", None) or type(model).__name__)
    label = model or default_model()
    return load_model(label, device=device, lora=lora), label


def compare(
    policies: str | Sequence | dict = DEFAULT_POLICIES,
    prompts: str | Sequence[str] = DEFAULT_PROMPTS,
    *,
    rewards: str | Sequence | dict | None = None,
    model: Any = None,
    out: str | os.PathLike = "outputs/compare",
    num_prompts: int | None = 64,
    first_prompts: int | None = None,
    seeds: int | Sequence[int] = 4,
    common_noise: bool = False,
    reference_steps: int | None = None,
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
    lora: str | Sequence[str] | None = None,
):
    """Compare policies on a prompt set with the same seeds; write tables, grids and plots to ``out``.

    The Python twin of ``tpm compare`` (outputs: :mod:`tpm.comparison.api`). Returns a
    :class:`tpm.comparison.ComparisonResult`.

    Args:
        policies: names (``"synchronous"``, ``"asyndm:piecewise_linear"``...), exported policy
            directories, Policy objects, or a ``{label: Policy}`` dict; a comma-separated string works.
            The first is the reference of the paired differences.
        prompts: a prompt set (:func:`tpm.loading.load_prompts`: ``testbed:val``, ``animal-activity``,
            ``NAME=FILE_OR_HUB_ID``, a file, a hub id) or a list of prompt strings.
        rewards: reward names (``name`` or ``name:key=value``), callables ``(images, prompts) -> scores``
            or a ``{label: callable}`` dict. Default: the testbed verifier (score and all-correct) for
            testbed prompts; other prompt sets need rewards named.
        model: a diffusers pipeline, or a model spec (:func:`tpm.loading.load_model`: path / hub id,
            ``testbed:flux``, ``tiny:flux``); default: the shipped testbed Flux.
        lora: LoRA adapters loaded into the model's backbone (``"PATH_OR_ID[:SCALE],..."`` or a list).
        num_prompts: seeded subset size (None = all); first_prompts: take the set's first n prompts
            instead (as a training run's ``grpo.eval_prompts`` does).
        seeds: noise sets, a count n (0..n-1) or a list. Image (prompt, seed) starts from the noise the
            evaluation protocol draws for that pair (:mod:`tpm.comparison.protocol`), as a training
            run's evaluation does; ``common_noise``: every prompt of a seed from the same noise.
        reference_steps: add the synchronous sampler at this step count as a row of every table.
        steps: one step count or several (several add ``reward_vs_steps.png``); None = the
            pipeline's default.
        guidance_scale: CFG strength, passed as the pipeline takes it; None = the pipeline's default.
        batch_prompts: prompts per sampling call (each with all its seeds).
        overwrite: discard a previous comparison's cache in ``out`` instead of resuming it.
    """
    from tpm.comparison import CompareError, run_comparison, seed_list

    pol = resolve_policies(policies)
    if first_prompts is not None:
        if first_prompts < 1:
            raise CompareError(f"first_prompts must be >= 1, got {first_prompts}")
        if num_prompts is not None:
            raise CompareError("give either num_prompts (a seeded subset) or first_prompts (the first n), not both")
    if isinstance(prompts, str):
        prompt_list = load_prompts(prompts, num_prompts, prompt_seed, prompt_column, prompt_split)[:first_prompts]
        prompt_label = prompts
    else:
        prompt_list = [str(p) for p in prompts]
        if not prompt_list:
            raise CompareError("the prompt list is empty")
        prompt_list = subset(prompt_list, num_prompts, prompt_seed)[:first_prompts]
        prompt_label = f"{len(prompt_list)} given prompts"
    rew = resolve_rewards(rewards, testbed_domain(prompts) or False)
    seeds = seed_list(seeds)
    if model is None and testbed_domain(prompts) == "spatial":
        model = "testbed:spatial"  # the spatial testbed's prompts are drawn by its own model
    pipe, model_label = _pipeline(model, device, lora)
    if lora:
        model_label += f" + LoRA {lora if isinstance(lora, str) else ','.join(map(str, lora))}"
    if model_label.startswith("tiny:") and height is None and width is None:
        height = width = 32  # random tiny models: keep the images (and the run) small
    chosen = (f"the first {len(prompt_list)}" if first_prompts is not None
              else f"{len(prompt_list)} prompts, seed {prompt_seed}")
    notes = [f"model: `{model_label}`; prompts: `{prompt_label}` ({chosen}); seeds: "
             f"{seeds if len(seeds) <= 8 else f'{len(seeds)} seeds'} "
             f"({'common noise per seed' if common_noise else 'noise drawn per (prompt, seed)'}); "
             f"guidance: {guidance_scale if guidance_scale is not None else 'pipeline default'}"]
    return run_comparison(pipe, pol, rew, prompt_list, out=out, seeds=seeds, steps=steps,
                          guidance_scale=guidance_scale, height=height, width=width, batch_prompts=batch_prompts,
                          heatmap_prompt=heatmap_prompt, num_resamples=num_resamples, model_label=model_label,
                          notes=notes, overwrite=overwrite, progress=progress, common_noise=common_noise,
                          reference_steps=reference_steps)


# ---- commands --------------------------------------------------------------------------------------
def cmd_sample(args) -> int:
    import torch

    import policies
    from tpm.backbones import get_backbone
    from tpm.plots import field_strip
    from tpm.sampler import sample

    if (args.image is None) != (args.mask is None):
        raise CLIError("inpainting needs both --image IN.png and --mask MASK.png (white = generate)")
    if args.image is not None and args.policy != "synchronous":
        raise CLIError("--image/--mask build the inpainting policy; do not combine them with --policy")
    if args.input_guidance and args.image is None:
        raise CLIError("--input-guidance needs a known region: pass --image and --mask")
    policy = None if args.image is not None else policies.load(args.policy)
    model = args.model or default_model()
    pipe = load_model(model, device=args.device, lora=args.lora)
    if args.image is not None:
        policy, args.height, args.width = _inpaint_policy(pipe, args.image, args.mask, args.height, args.width)
    cfg = get_backbone(pipe).sample_kwargs(args.guidance_scale)
    prompts = list(args.prompt)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for seed in range(args.seed, args.seed + args.num_images):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        try:
            out = sample(pipe, prompts, policy=policy, num_inference_steps=args.steps, height=args.height,
                             width=args.width, generator=gen, return_trajectory=args.save_fields, progress=True,
                             input_guidance=args.input_guidance, input_guidance_time=args.input_guidance_time,
                             **cfg)
        except TypeError as e:  # a policy returning the wrong types
            raise CLIError(str(e)) from None
        for i, img in enumerate(out.images):
            path = os.path.join(args.out, f"{i:03d}_seed{seed}.png")
            img.save(path)
            written.append(path)
            if args.save_fields:
                written.append(field_strip(out.trajectory, os.path.join(args.out, f"{i:03d}_seed{seed}_fields.png"),
                                           sample=i))
    print(json.dumps({"model": model, "policy": "inpaint" if args.image else args.policy, "written": written},
                     indent=1))
    return 0


def _inpaint_policy(pipe, image_path: str, mask_path: str, height: int | None, width: int | None):
    """The inpainting policy for ``tpm sample --image --mask``; sampling runs at the image's size."""
    from PIL import Image

    from policies.spatial import inpaint_policy

    try:
        image, mask = Image.open(image_path), Image.open(mask_path)
    except (OSError, ValueError) as e:
        raise CLIError(f"could not read the image or mask ({e})") from None
    w, h = image.size
    if (height or h) != h or (width or w) != w:
        raise CLIError(f"inpainting samples at the image's size {w}x{h}; drop --height/--width or resize it")
    return inpaint_policy(pipe, image, mask), h, w


def cmd_reward_serve(argv: list[str]) -> int:
    """``tpm reward-serve ...``: parsed by ``rewards.server``'s own parser, so ``--help`` lists every
    option and the options live next to the server they configure."""
    from rewards import server

    return server.main(argv) or 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def cmd_compare(args) -> int:
    seeds = args.seeds if args.seed_list is None else args.seed_list
    result = compare(
        args.policies, args.prompts, rewards=args.rewards, model=args.model, out=args.out,
        num_prompts=None if args.num_prompts == 0 or args.first_prompts else args.num_prompts,
        first_prompts=args.first_prompts, seeds=seeds, common_noise=args.common_noise,
        reference_steps=args.reference_steps,
        steps=args.steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width,
        batch_prompts=args.batch_prompts, prompt_column=args.prompt_column, prompt_split=args.prompt_split,
        prompt_seed=args.prompt_seed, heatmap_prompt=args.heatmap_prompt, device=args.device,
        overwrite=args.overwrite, lora=args.lora,
    )
    with open(result.files["summary"]) as f:
        print(f.read())
    for card_dir in args.add_to_card or []:
        from tpm.model_card import add_comparison

        try:
            result.files[f"card:{card_dir}"] = add_comparison(card_dir, args.out)
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
    print(json.dumps(result.files, indent=1))
    return 0


def cmd_export_scheduler(args) -> int:
    """``tpm export-scheduler``: a policy as a diffusers scheduler folder (``tpm.schedulers``)."""
    import policies
    from tpm.schedulers import to_scheduler

    if args.test_prompts and not args.prompts:
        raise CLIError("--test-prompts measures a distillation; give the prompt set to distil over with --prompts")
    policy = policies.load(args.policy)
    policy.source_label = args.policy  # the name the card shows
    model = args.model or default_model()
    pipe = load_model(model, device=args.device, lora=args.lora)
    n = None if args.num_prompts == 0 else args.num_prompts
    prompts = load_prompts(args.prompts, n, args.prompt_seed) if args.prompts else None
    test_set = args.test_prompts
    domain = testbed_domain(args.prompts) if args.prompts else None
    if test_set is None and domain:
        test_set = "testbed:spatial-test" if domain == "spatial" else "testbed:test"  # the held-out split
    test = load_prompts(test_set, n, args.prompt_seed) if test_set and prompts is not None else None
    reward = None
    if test is not None:
        test_domain = testbed_domain(test_set)
        specs = args.rewards or ({"shapes": "testbed", "spatial": "testbed_spatial"}.get(test_domain))
        if specs:
            rew = resolve_rewards(specs, test_domain or False)
            if len(rew) != 1:
                raise CLIError("--rewards takes one reward for the held-out measurement")
            reward = next(iter(rew.values()))
    if model.startswith("tiny:") and args.height is None and args.width is None:
        args.height = args.width = 32  # random tiny models: keep the run small
    seeds = tuple(range(args.seeds))
    sched = to_scheduler(pipe, policy, args.steps, prompts=prompts, seeds=seeds, test_prompts=test, test_seeds=seeds,
                         reward=reward, height=args.height, width=args.width, guidance_scale=args.guidance_scale,
                         report=lambda line: print(line, file=sys.stderr))
    info = dict(sched.config.export_info)
    info.update(model=model, prompts=args.prompts, test_prompts=test_set if test is not None else None)
    sched.register_to_config(export_info=info)
    sched.save_pretrained(args.out)
    print(json.dumps({"out": args.out, "scheduler": type(sched).__name__, "method": info["method"],
                      "heldout": info.get("heldout")}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpm", description="Timestep policies for diffusion and flow models")
    sub = p.add_subparsers(dest="command", required=True)
    _add_sample(sub)
    _add_compare(sub)
    _add_export_scheduler(sub)
    sub.add_parser("train", add_help=False, help="train a timestep policy with GRPO (tpm train --help; the same as "
                   "accelerate launch -m tpm train)")
    sub.add_parser("search", add_help=False, help="search the best fixed table in a run's action space on its eval "
                   "prompts, saved as a policy (tpm search --help; reads the run's config as tpm train does)")
    # Listed here for `tpm --help`; main() hands its arguments to rewards.server's parser.
    sub.add_parser("reward-serve", add_help=False,
                   help="serve a reward model over HTTP (tpm and Flow-Factory protocols); see `tpm reward-serve -h`")
    return p


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="sample images with a policy and write PNGs")
    s.add_argument("--model", default=None, help="pipeline path / hub id, testbed:flux|sd3|flux-asyncpatch|unet|spatial, or tiny:flux|sd3")
    s.add_argument("--lora", action="append", default=None,
                   help="LoRA adapter to load into the backbone: a diffusers LoRA file/folder/hub id or a peft "
                        "adapter folder, optionally PATH:SCALE; repeat or comma-separate for several")
    s.add_argument("--policy", default="synchronous",
                   help="policy name (e.g. asyndm, asyndm:exponential), exported directory, or Hub repo id org/name[@rev]")
    s.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    s.add_argument("--steps", type=int, default=None, help="number of denoising steps (pipeline default)")
    s.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG strength, passed as the pipeline takes it (pipeline default)")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed..seed+n-1)")
    s.add_argument("--device", default=None)
    s.add_argument("--out", default="outputs/samples")
    s.add_argument("--save-fields", action="store_true",
                   help="also write a PNG strip per image: tau, tau_cond - tau (if the policy sets it) and mask per step")
    s.add_argument("--image", default=None, help="inpainting: the known image (PNG); needs --mask")
    s.add_argument("--mask", default=None, help="inpainting: binary mask of the image's size, white = generate")
    s.add_argument("--input-guidance", type=float, default=0.0,
                   help="AsyncPatch input guidance strength for inpainting (0 = off; costs a second call per step)")
    s.add_argument("--input-guidance-time", type=float, default=1.0,
                   help="time the known region is re-noised to for input guidance, in (0, 1]")


def _add_compare(sub) -> None:
    c = sub.add_parser("compare", help="compare policies on a prompt set with the same seeds (table, grid, plots)")
    c.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="comma-separated policy names, exported policy or scheduler (tpm export-scheduler) "
                        "directories, or Hub repo ids; the first is the reference")
    c.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help="prompt set name (testbed:val, animal-activity, drawbench=FILE_OR_ID, ...), a file or a hub id")
    c.add_argument("--rewards", default=None,
                   help="comma-separated reward names (name or name:key=value); default: the testbed verifier")
    c.add_argument("--model", default=None, help="as for `tpm sample`; default: the testbed Flux (testbed:spatial for the spatial testbed's prompt sets)")
    c.add_argument("--lora", action="append", default=None,
                   help="LoRA adapter to load into the backbone: a diffusers LoRA file/folder/hub id or a peft "
                        "adapter folder, optionally PATH:SCALE; repeat or comma-separate for several")
    c.add_argument("--num-prompts", type=int, default=64, help="seeded subset of the prompt set (0 = all)")
    c.add_argument("--first-prompts", type=int, default=None,
                   help="the first N prompts of the set instead of a seeded subset (as a training run's eval_prompts)")
    c.add_argument("--seeds", type=int, default=4,
                   help="noise sets per prompt (0..n-1); the noise is drawn per (prompt, seed) pair")
    c.add_argument("--seed-list", type=_int_list, default=None,
                   help="explicit noise sets, e.g. 1000,1001 (overrides --seeds)")
    c.add_argument("--common-noise", action="store_true",
                   help="every prompt of a seed starts from the same noise (the seed itself); means are then "
                        "conditional on a few noises")
    c.add_argument("--reference-steps", type=int, default=None,
                   help="also score the synchronous sampler at this step count, as a row of every table")
    c.add_argument("--steps", type=_int_list, default=None,
                   help="step count(s), e.g. 20 or 5,10,20 (several add reward_vs_steps.png); default: the pipeline's")
    c.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG strength, passed as the pipeline takes it (pipeline default)")
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--batch-prompts", type=int, default=4, help="prompts per sampling call, each with all seeds")
    c.add_argument("--prompt-column", default=None, help="column of a csv/json/hub prompt set")
    c.add_argument("--prompt-split", default="train", help="dataset split of a hub prompt set")
    c.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt subset")
    c.add_argument("--heatmap-prompt", type=int, default=0, help="prompt index whose time fields are plotted")
    c.add_argument("--device", default=None)
    c.add_argument("--out", default="outputs/compare")
    c.add_argument("--overwrite", action="store_true", help="discard the cache in --out instead of resuming")
    c.add_argument("--add-to-card", action="append", metavar="POLICY_DIR",
                   help="put summary.md into this exported policy folder's README.md card (repeat for several)")


def _add_export_scheduler(sub) -> None:
    e = sub.add_parser("export-scheduler", help="export a policy as a diffusers scheduler folder for the unchanged "
                       "pipeline (pipe.scheduler = tpm.schedulers.from_pretrained(DIR))")
    e.add_argument("policy", help="policy name, exported policy directory or Hub repo id org/name[@rev]")
    e.add_argument("--model", default=None, help="as for `tpm sample`; default: the testbed Flux")
    e.add_argument("--lora", action="append", default=None, help="LoRA adapter, as for `tpm sample`")
    e.add_argument("--steps", type=int, required=True, help="num_inference_steps the scheduler is made for")
    e.add_argument("--out", required=True, help="folder to write (scheduler_config.json + README.md)")
    e.add_argument("--prompts", default=None,
                   help="state-dependent policies: prompt set whose mean table is exported (e.g. testbed:train)")
    e.add_argument("--test-prompts", default=None,
                   help="held-out prompt set the distillation is measured on (default for testbed sets: testbed:test)")
    e.add_argument("--rewards", default=None, help="reward for the held-out measurement (default: testbed verifier "
                   "for testbed prompts; without one only the schedule gap is measured)")
    e.add_argument("--num-prompts", type=int, default=64, help="seeded subset of each prompt set (0 = all)")
    e.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt subsets")
    e.add_argument("--seeds", type=int, default=1, help="noise seeds per prompt (0..n-1)")
    e.add_argument("--guidance-scale", type=float, default=None, help="CFG strength (pipeline default)")
    e.add_argument("--height", type=int, default=None, help="image height (matters under dynamic shifting)")
    e.add_argument("--width", type=int, default=None)
    e.add_argument("--device", default=None)


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error (every error class of tpm, policies and rewards is a ValueError)
    becomes ``error: <message>`` on stderr and exit status 1."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["reward-serve"]:
        return cmd_reward_serve(argv[1:])
    parser = build_parser()
    if argv[:1] == ["train"]:  # its own parser: every config field is a flag (tpm.app.recipe)
        from tpm.app.train import main as train_main

        train_main(argv[1:], prog="tpm train")
        return 0
    if argv[:1] == ["search"]:  # the run's config flags too (tpm.app.recipe), and the search's own
        from tpm.app.search import main as search_main

        search_main(argv[1:])
        return 0
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "export-scheduler":
            return cmd_export_scheduler(args)
        return cmd_sample(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    raise SystemExit(main())
