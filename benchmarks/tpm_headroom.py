"""How much can a timestep policy gain on a backbone? Verifier score of constant deviations.

    python benchmarks/tpm_headroom.py --model testbed:flux --steps 10 --r 0.2,0.35,0.5,0.65,0.8 --n 256

The TPM's action at each step is r in [0, 1], giving the pseudo-timestep
``t*_k = t_{k-1} + (0.5 + r) dt`` (AsyncDiff Eq. 6; r = 0.5 is the synchronous sampler). Before
reading a GRPO result this script asks a simpler question: if the same r were used at every
step for every prompt, how would the reward move? Every r is run on the same prompts and noises,
so the differences against r = 0.5 are paired; the JSON gives each mean with a 95 % bootstrap
interval of the paired difference. A GRPO-trained TPM can do better than the best constant only by
conditioning r on the prompt and the current latent. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from policies.tpm import deviation_factor, pseudo_timestep
from tpm.fields import synchronous_next
from tpm.policy import Action, Policy, State


class ConstantDeviation(Policy):
    """The TPM's action with a fixed r at every step (Algorithm 2: step 0 keeps t*_0 = t_0)."""

    config_class = dict

    def __init__(self, r: float):
        super().__init__(config={})
        self.r = float(r)

    def act(self, state: State) -> Action:
        prev = state.memory.get("prev_tau")
        state.memory["prev_tau"] = state.tau
        if prev is None:
            return Action(tau_next=synchronous_next(state))
        eta = deviation_factor(torch.full((state.batch_size,), self.r))
        return Action(tau_next=synchronous_next(state), tau_cond=pseudo_timestep(prev, state.tau, eta, 1e-3))


def main(argv: list[str] | None = None) -> dict:
    from tpm.comparison.stats import paired_bootstrap
    from tpm.loading import load_model
    from tpm.sampler import sample
    from tpm.testbed.splits import sample_prompts
    from tpm.testbed.verifier import Verifier

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed:flux")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--r", default="0.2,0.35,0.5,0.65,0.8")
    ap.add_argument("--n", type=int, default=256, help="val prompts (categories drawn uniformly), one noise each")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_model(args.model)
    prompts = [it.prompt for it in sample_prompts(args.n, split="val", seed=args.seed)]
    verifier = Verifier()
    scores: dict[float, np.ndarray] = {}
    for r in [float(x) for x in args.r.split(",")]:
        vals = []
        for b in range(0, len(prompts), args.batch_size):
            chunk = prompts[b:b + args.batch_size]
            gens = [torch.Generator().manual_seed(args.seed * 100_003 + b + i) for i in range(len(chunk))]
            out = sample(pipe, chunk, policy=ConstantDeviation(r), num_inference_steps=args.steps, generator=gens)
            vals += [res.score for res in verifier.verify_batch(out.images, chunk)]
        scores[r] = np.asarray(vals)
    ref = scores.get(0.5)
    rows = {}
    for r, s in scores.items():
        row = {"mean": round(float(s.mean()), 4)}
        if ref is not None and r != 0.5:
            diff = paired_bootstrap(s, ref, seed=args.seed)
            row["minus_synchronous"] = [round(diff.estimate, 4), round(diff.low, 4), round(diff.high, 4)]
        rows[str(r)] = row
    report = {"model": args.model, "steps": args.steps, "n": len(prompts), "r": rows}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
