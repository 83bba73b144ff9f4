"""``tpm`` command line: ``tpm sample``, ``tpm compare``, ``tpm reward-serve``.

This is the one place in ``tpm`` that wires ``policies`` and ``rewards`` (SPEC §7).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load_model(model: str, device: str | None = None, dtype: str = "float32"):
    """A diffusers pipeline from a local path / hub id, or ``testbed:NAME`` for the shipped testbed."""
    import torch

    if model.startswith("testbed:"):
        from tpm import testbed

        pipe = testbed.load_pipeline(model.split(":", 1)[1])
    elif model.startswith("tiny:"):
        from tpm import testing

        kind = model.split(":", 1)[1]
        builders = {"flux": testing.tiny_flux_pipeline, "sd3": testing.tiny_sd3_pipeline}
        if kind not in builders:
            raise SystemExit(f"unknown tiny model {kind!r}; choose from {sorted(builders)}")
        pipe = builders[kind]()
    else:
        from diffusers import DiffusionPipeline

        if not os.path.isdir(model) and os.path.sep in model and not model.count("/") == 1:
            raise SystemExit(f"model path {model!r} does not exist")
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype))
        except OSError as e:
            raise SystemExit(
                f"could not load pipeline {model!r}: {e}\n"
                "Pass a local directory saved with `save_pretrained`, or a hub id available in your HF cache "
                "(HF_HOME); offline machines cannot download weights."
            ) from None
    if device:
        pipe = pipe.to(device)
    return pipe


def _default_model() -> str:
    try:
        from tpm import testbed

        testbed.load_pipeline  # noqa: B018 - present once the testbed checkpoints ship
        return "testbed:flux"
    except (ImportError, AttributeError):
        return "tiny:flux"


def cmd_sample(args) -> int:
    import torch

    import policies
    import tpm
    from tpm.plots import field_strip

    if (args.image is None) != (args.mask is None):
        raise SystemExit("error: inpainting needs both --image IN.png and --mask MASK.png (white = generate)")
    if args.image is not None and args.policy != "synchronous":
        raise SystemExit("error: --image/--mask build the inpainting policy; do not combine them with --policy")
    if args.input_guidance and args.image is None:
        raise SystemExit("error: --input-guidance needs a known region: pass --image and --mask")
    try:
        policy = None if args.image is not None else policies.load(args.policy)
    except policies.PolicyError as e:
        raise SystemExit(f"error: {e}") from None
    pipe = load_model(args.model or _default_model(), args.device)
    if args.image is not None:
        policy, args.height, args.width = _inpaint_policy(pipe, args.image, args.mask, args.height, args.width)
    prompts = list(args.prompt)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for seed in range(args.seed, args.seed + args.num_images):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        try:
            out = tpm.sample(pipe, prompts, policy=policy, num_inference_steps=args.steps,
                             guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                             generator=gen, return_trajectory=args.save_fields, progress=True,
                             input_guidance=args.input_guidance, input_guidance_time=args.input_guidance_time)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: {e}") from None
        for i, img in enumerate(out.images):
            path = os.path.join(args.out, f"{i:03d}_seed{seed}.png")
            img.save(path)
            written.append(path)
            if args.save_fields:
                written.append(field_strip(out.trajectory, os.path.join(args.out, f"{i:03d}_seed{seed}_fields.png"),
                                           sample=i))
    print(json.dumps({"model": args.model or _default_model(), "policy": "inpaint" if args.image else args.policy,
                      "written": written}, indent=1))
    return 0


def _inpaint_policy(pipe, image_path: str, mask_path: str, height: int | None, width: int | None):
    """The inpainting policy for ``tpm sample --image --mask``; sampling runs at the image's size."""
    from PIL import Image

    from policies.spatial import inpaint_policy
    from tpm.policy import PolicyError

    try:
        image, mask = Image.open(image_path), Image.open(mask_path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not read the image or mask ({e})") from None
    w, h = image.size
    if (height or h) != h or (width or w) != w:
        raise SystemExit(f"error: inpainting samples at the image's size {w}x{h}; drop --height/--width or resize it")
    try:
        return inpaint_policy(pipe, image, mask), h, w
    except PolicyError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_reward_serve(args, rest) -> int:
    from rewards import server

    return server.main([args.name, *rest]) or 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def cmd_compare(args) -> int:
    from tpm.comparison import CompareError, PromptSetError, compare

    seeds = args.seeds if args.seed_list is None else args.seed_list
    try:
        result = compare(
            args.policies, args.prompts, rewards=args.rewards, model=args.model, out=args.out,
            num_prompts=None if args.num_prompts == 0 else args.num_prompts, seeds=seeds,
            steps=args.steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width,
            batch_prompts=args.batch_prompts, prompt_column=args.prompt_column, prompt_split=args.prompt_split,
            prompt_seed=args.prompt_seed, heatmap_prompt=args.heatmap_prompt, device=args.device,
            overwrite=args.overwrite,
        )
    except (CompareError, PromptSetError) as e:
        raise SystemExit(f"error: {e}") from None
    with open(result.files["summary"]) as f:
        print(f.read())
    print(json.dumps(result.files, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpm", description="Timestep policies for diffusion and flow models")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample images with a policy and write PNGs")
    s.add_argument("--model", default=None, help="pipeline path / hub id, testbed:flux|sd3|flux-asyncpatch, or tiny:flux|sd3")
    s.add_argument("--policy", default="synchronous", help="policy name (e.g. asyndm, asyndm:exponential) or directory")
    s.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    s.add_argument("--steps", type=int, default=None, help="number of denoising steps (pipeline default)")
    s.add_argument("--guidance-scale", type=float, default=None)
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed..seed+n-1)")
    s.add_argument("--device", default=None)
    s.add_argument("--out", default="outputs/samples")
    s.add_argument("--save-fields", action="store_true", help="also write a PNG strip of the field and mask per step")
    s.add_argument("--image", default=None, help="inpainting: the known image (PNG); needs --mask")
    s.add_argument("--mask", default=None, help="inpainting: binary mask of the image's size, white = generate")
    s.add_argument("--input-guidance", type=float, default=0.0,
                   help="AsyncPatch input guidance strength for inpainting (0 = off; costs a second call per step)")
    s.add_argument("--input-guidance-time", type=float, default=1.0,
                   help="time the known region is re-noised to for input guidance, in (0, 1]")
    c = sub.add_parser("compare", help="compare policies on a prompt set with the same seeds (table, grid, plots)")
    c.add_argument("--policies", default="synchronous,asyndm,dm_concave",
                   help="comma-separated policy names or exported directories; the first is the reference")
    c.add_argument("--prompts", default="testbed-val",
                   help="prompt set name (testbed-val, animal-activity, drawbench=FILE_OR_ID, ...), a file or a hub id")
    c.add_argument("--rewards", default=None,
                   help="comma-separated reward names (name or name:key=value); default: the testbed verifier")
    c.add_argument("--model", default=None, help="as for `tpm sample`; default: the testbed Flux")
    c.add_argument("--num-prompts", type=int, default=64, help="seeded subset of the prompt set (0 = all)")
    c.add_argument("--seeds", type=int, default=4, help="seeds per prompt (0..n-1)")
    c.add_argument("--seed-list", type=_int_list, default=None, help="explicit seeds, e.g. 3,7,11 (overrides --seeds)")
    c.add_argument("--steps", type=_int_list, default=None,
                   help="step count(s), e.g. 20 or 5,10,20 (several add reward_vs_steps.png); default: the pipeline's")
    c.add_argument("--guidance-scale", type=float, default=None)
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
    r = sub.add_parser("reward-serve", help="serve a reward model over loopback HTTP")
    r.add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "reward-serve":
        return cmd_reward_serve(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "compare":
        return cmd_compare(args)
    return cmd_sample(args)


if __name__ == "__main__":
    raise SystemExit(main())
