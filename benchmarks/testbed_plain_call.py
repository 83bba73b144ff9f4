"""Verifier score of the shipped testbed Flux called plainly, and what a plain diffusers call would give.

    python benchmarks/testbed_plain_call.py                  # load_pipeline("flux")(prompts) only
    python benchmarks/testbed_plain_call.py --with-512       # also FluxPipeline.from_pretrained(folder)(prompts,
                                                             # height=32, width=32): diffusers' 512 text tokens

Prints JSON: the mean verifier score over ``--num-prompts`` val prompts (a seeded subset), 20 steps,
a generator seeded per batch of 32 (the same noise for both calls). The second call is slow: its
transformer sees 512 text tokens instead of 10.
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> dict:
    import torch
    from diffusers import FluxPipeline

    from tpm.loading import load_prompts
    from tpm.testbed import Verifier, load_pipeline
    from tpm.testbed.models import CHECKPOINT_DIR

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=160)
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--with-512", action="store_true")
    args = p.parse_args(argv)
    prompts = load_prompts("testbed:val", n=args.num_prompts, seed=args.prompt_seed)
    verifier = Verifier()

    def score(call) -> float:
        scores = []
        for i in range(0, len(prompts), 32):
            batch = prompts[i:i + 32]
            images = call(batch, torch.Generator().manual_seed(i))
            scores += [verifier.verify(im, text).score for im, text in zip(images, batch)]
        return round(sum(scores) / len(scores), 4)

    pipe = load_pipeline("flux")
    out = {"prompts": f"testbed:val, {len(prompts)} (seed {args.prompt_seed})", "steps": 20,
           "plain call: load_pipeline('flux')(prompts)": score(lambda b, g: pipe(b, generator=g).images)}
    if args.with_512:
        plain = FluxPipeline.from_pretrained(CHECKPOINT_DIR / "flux", torch_dtype=torch.float32)
        plain.set_progress_bar_config(disable=True)
        out["FluxPipeline.from_pretrained(folder)(prompts, height=32, width=32): 512 text tokens"] = score(
            lambda b, g: plain(b, generator=g, height=32, width=32, num_inference_steps=20).images)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
