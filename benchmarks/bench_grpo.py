"""GRPO overhead: time of one training iteration over the time of its rollouts alone, and replay bytes.

    python benchmarks/bench_grpo.py [--backbone flux|sd3] [--steps 10] [--group 16] [--repeats 5]
    python benchmarks/bench_grpo.py --resolution 64 --head-dim 64 --layers 4   # a larger backbone

Builds the testbed backbone from its config (random weights: speed does not depend on training),
a TPM as in ``recipes/grpo_flux.py``, and a trivial reward (mean brightness) so that the ratio
measures the trainer itself: replaying stored inputs through the policy network, the PPO update
and bookkeeping, on top of the rollouts (goal <= 1.15). The testbed verifier's time per batch is
reported separately. Prints one JSON object.

The update replays every decision through the policy with gradients (about 2.5 times the
policy's forward cost), so ``ratio - 1`` is roughly 2.5 x ``policy_share_of_rollout``, the
fraction of rollout time spent in the policy's own forward passes. On the 1.8M-parameter testbed
backbone the TPM is not small next to it; on a larger backbone the share, and the ratio, fall.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def real_size_bytes(steps: int = 10, batch: int = 2) -> float:
    """Replay bytes per sample-step for Flux.1-dev at 512x512 with the flux_dev.yaml TPM, from the
    policy's own ``act`` on synthetic states of the real shapes (no backbone is run)."""
    import policies
    from tpm.grpo.rollout import RolloutBatch, collect
    from tpm.policy import State

    opts = {"width": 256, "heads": 8, "layers": 4, "image_grid": 8, "text_tokens": 8}
    policy = policies.TPM(token_dim=64, text_dim=4096, pooled_dim=768, **opts)
    sigmas = torch.linspace(1, 0, steps + 1)
    grid, memory, actions = (32, 32), {}, []
    embeds, pooled = torch.randn(batch, 512, 4096), torch.randn(batch, 768)
    with torch.no_grad(), policy.exploring():
        for k in range(steps):
            lat = torch.randn(batch, 1024, 64)
            state = State(step=k, num_steps=steps, sigmas=sigmas, tau=sigmas[k].expand(batch, *grid).clone(),
                          latents=lat, grid=grid, prompts=[""] * batch, velocity=None if k == 0 else lat,
                          x0=None if k == 0 else lat, memory=memory, text_embeds=embeds, pooled=pooled)
            actions.append(policy.act(state))
    st, static, logp = collect(actions, policy.static_inputs, batch)
    rb = RolloutBatch([""] * batch, torch.zeros(batch, 3, 1, 1), st, static, logp)
    return rb.stored_bytes() / (batch * rb.num_decisions)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="flux", choices=["flux", "sd3"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--minibatch", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--image-grid", type=int, default=4, help="TPM pooled patch grid side (recipe default 4)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--resolution", type=int, default=32, help="backbone image side (tokens grow with it)")
    p.add_argument("--head-dim", type=int, default=32, help="backbone head dim (width = 4 heads x this)")
    p.add_argument("--layers", type=int, default=2, help="backbone blocks (Flux: double and single each)")
    args = p.parse_args(argv)

    import policies
    import rewards
    from tpm.grpo import GRPOConfig, GRPOTrainer
    from tpm.testbed import get_split
    from tpm.testbed.models import TestbedModelConfig, build_pipeline

    pipe = build_pipeline(TestbedModelConfig(backbone=args.backbone, resolution=args.resolution,
                                             head_dim=args.head_dim, num_layers=args.layers,
                                             num_single_layers=args.layers))
    torch.manual_seed(0)
    policy = policies.TPM.for_pipeline(pipe, width=args.width, heads=4, layers=4, image_grid=args.image_grid)
    prompts = [it.prompt for it in get_split("train", n=64)]

    def brightness(images, prompts):
        return images.float().mean(dim=(1, 2, 3))

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, max_iterations=10 ** 6, group_size=args.group, batch_size=args.group,
                         rollout_batch_size=args.group, minibatch_size=args.minibatch,
                         num_inference_steps=args.steps, height=args.resolution, width=args.resolution,
                         progress=False)
        tr = GRPOTrainer(cfg, policy, pipe, brightness, prompts)
        tr._prepare_output()
        tr.train_iteration()  # warm-up
        full, roll, share, bytes_per = [], [], [], 0.0
        act_s = [0.0]

        def timed_act(state):  # the policy's forward passes inside the rollout, for the share
            t0 = time.perf_counter()
            out_ = type(policy).act(policy, state)
            act_s[0] += time.perf_counter() - t0
            return out_

        for _ in range(args.repeats):
            t = time.perf_counter()
            rec = tr.train_iteration()
            full.append(time.perf_counter() - t)
            bytes_per = rec["bytes_per_sample_step"]
            policy.act, act_s[0] = timed_act, 0.0
            t = time.perf_counter()
            batch = tr.rollout_iteration(tr.iteration)
            roll.append(time.perf_counter() - t)
            share.append(act_s[0] / roll[-1])
            del policy.act  # back to the class's method
        verifier = rewards.load("testbed")
        t = time.perf_counter()
        verifier.raw_scores(batch.images, batch.prompts)
        reward_s = time.perf_counter() - t
    it_s, ro_s = statistics.median(full), statistics.median(roll)
    real = real_size_bytes()
    print(json.dumps({
        "benchmark": "grpo_iteration_overhead", "backbone": f"testbed-{args.backbone} (random weights)",
        "backbone_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "policy_parameters": sum(p.numel() for p in policy.parameters()), "resolution": args.resolution,
        "samples_per_iteration": args.group, "steps": args.steps, "decisions_per_sample": batch.num_decisions,
        "tpm_width": args.width, "tpm_image_grid": args.image_grid, "torch_threads": torch.get_num_threads(),
        "iteration_s": round(it_s, 4), "rollout_s": round(ro_s, 4), "ratio": round(it_s / ro_s, 4),
        "policy_share_of_rollout": round(statistics.median(share), 4),
        "goal_ratio": 1.15, "bytes_per_sample_step": bytes_per, "testbed_verifier_s": round(reward_s, 4),
        "flux_dev_512_bytes_per_sample_step": real,
        "iteration_times_s": [round(x, 4) for x in full], "rollout_times_s": [round(x, 4) for x in roll],
    }, indent=2))


if __name__ == "__main__":
    main()
