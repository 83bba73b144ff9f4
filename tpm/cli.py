"""``tpm`` command line: ``tpm sample``, ``tpm reward-serve`` (and later ``tpm compare``).

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

    try:
        policy = policies.load(args.policy)
    except policies.PolicyError as e:
        raise SystemExit(f"error: {e}") from None
    pipe = load_model(args.model or _default_model(), args.device)
    prompts = list(args.prompt)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for seed in range(args.seed, args.seed + args.num_images):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        try:
            out = tpm.sample(pipe, prompts, policy=policy, num_inference_steps=args.steps,
                             guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                             generator=gen, return_trajectory=args.save_fields, progress=True)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: {e}") from None
        for i, img in enumerate(out.images):
            path = os.path.join(args.out, f"{i:03d}_seed{seed}.png")
            img.save(path)
            written.append(path)
            if args.save_fields:
                written.append(field_strip(out.trajectory, os.path.join(args.out, f"{i:03d}_seed{seed}_fields.png"),
                                           sample=i))
    print(json.dumps({"model": args.model or _default_model(), "policy": args.policy, "written": written}, indent=1))
    return 0


def cmd_reward_serve(args, rest) -> int:
    from rewards import server

    return server.main([args.name, *rest]) or 0


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
    return cmd_sample(args)


if __name__ == "__main__":
    raise SystemExit(main())
