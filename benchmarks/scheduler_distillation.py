"""What does a trained policy lose when it is distilled into a plain diffusers scheduler?

    python benchmarks/scheduler_distillation.py --policy outputs/grpo_flux/policy --steps 3 \\
        --train-prompts testbed:train --num-train 256 --prompts testbed:test --seeds 1000-1003

The policy (state-dependent: its times depend on the prompt and the noise) is exported with
``tpm.to_scheduler(pipe, policy, K, prompts=train)``: its mean table over ``--train-prompts``. On
``--prompts`` (held out) and noise sets no choice was made on, it scores with the testbed verifier
(:class:`verifier_bench.VerifierBench`, pairs by prompt and noise) the policy, its table (run as
``tpm.schedulers.ScheduleTable``, which is what the stock pipeline with the exported scheduler
computes) and the synchronous sampler, and reports table - policy and table - synchronous with 95 %
paired bootstrap intervals over prompts. It also checks that the stock pipeline with the exported
scheduler equals ``tpm.sample`` with the table on a few prompts (``stock_vs_table_max_abs``).
Prints JSON; ``--out`` also gets ``scheduler_distillation.json`` / ``.md`` and the scheduler folder.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from heldout_gain import parse_seeds
from verifier_bench import VerifierBench, paired_interval, write_report


def stock_vs_table(pipe, sched, table, prompts: list[str], steps: int, sample_kwargs: dict) -> float:
    """Max |pipe(...) with the scheduler - tpm.sample(...) with the table| over the final latents."""
    import tpm

    ref = tpm.sample(pipe, prompts, policy=table, num_inference_steps=steps, output_type="latent",
                     generator=torch.Generator().manual_seed(0), **sample_kwargs).images
    extra = getattr(pipe, "tpm_defaults", None) or {}
    msl = {"max_sequence_length": extra["max_sequence_length"]} if "max_sequence_length" in extra else {}
    old = pipe.scheduler
    pipe.scheduler = sched
    try:
        out = pipe(prompts, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                   **msl, **sample_kwargs).images
    finally:
        pipe.scheduler = old
    return float((out - ref).abs().max())


def main(argv: list[str] | None = None) -> dict:
    import policies
    from tpm.loading import load_prompts
    from tpm.schedulers import table_policy, to_scheduler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="policy directory, Hub repo id or name")
    ap.add_argument("--model", default="testbed:flux")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--train-prompts", default="testbed:train", help="prompt set the table is the mean over")
    ap.add_argument("--num-train", type=int, default=256, help="seeded subset of --train-prompts (0 = all)")
    ap.add_argument("--train-seeds", type=int, default=1, help="noise seeds per training prompt")
    ap.add_argument("--prompts", default="testbed:test", help="held-out prompt set")
    ap.add_argument("--seeds", default="1000-1003", help="held-out noise sets, e.g. 1000-1003 or 3,5,8")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    started = time.time()
    bench = VerifierBench(args.model, args.prompts, threads=args.threads, batch_size=args.batch_size)
    policy = policies.load(args.policy)
    train = load_prompts(args.train_prompts, args.num_train or None, 0)
    sched = to_scheduler(bench.pipe, policy, args.steps, prompts=train, seeds=tuple(range(args.train_seeds)),
                         batch_size=min(args.batch_size, 64), report=None, **bench.sample_kwargs)
    table = table_policy(sched)
    seeds = parse_seeds(args.seeds)
    pol, tab, sync = (bench.scores(p, args.steps, seeds) for p in (policy, table, None))
    info = sched.config.export_info
    report = {
        "policy": args.policy, "model": args.model, "steps": args.steps, "method": info["method"],
        "train_prompts": args.train_prompts, "n_train": len(train), "prompts": args.prompts,
        "n_prompts": len(bench.prompts), "seeds": seeds,
        "table": {"update": [round(x, 5) for x in sched.config.sigmas],
                  "told": [round(x, 5) for x in sched.config.cond_sigmas]},
        "train_spread": info.get("train_spread"),
        "policy_score": round(float(pol.mean()), 4), "table_score": round(float(tab.mean()), 4),
        "synchronous_score": round(float(sync.mean()), 4),
        "table_minus_policy": paired_interval(tab, pol), "table_minus_synchronous": paired_interval(tab, sync),
        "policy_minus_synchronous": paired_interval(pol, sync),
        "stock_vs_table_max_abs": stock_vs_table(bench.pipe, sched, table, bench.prompts[:4], args.steps,
                                                 bench.sample_kwargs),
        "seconds": round(time.time() - started, 1),
    }
    if args.out:
        sched.save_pretrained(os.path.join(args.out, "scheduler"))
    write_report(args.out, "scheduler_distillation", report, markdown(report))
    return report


def markdown(r: dict) -> str:
    f = "{:+.4f} [{:+.4f}, {:+.4f}]".format
    return "\n".join([
        f"{r['policy']} at {r['steps']} steps on {r['model']}; table = mean over {r['n_train']} {r['train_prompts']} "
        f"prompts; held out: {r['prompts']}, {r['n_prompts']} prompts x {len(r['seeds'])} noise sets", "",
        "| | verifier score | minus synchronous |", "|---|---|---|",
        f"| synchronous | {r['synchronous_score']:.4f} | |",
        f"| policy (tpm.sample) | {r['policy_score']:.4f} | {f(*r['policy_minus_synchronous'])} |",
        f"| its table (stock pipeline + exported scheduler) | {r['table_score']:.4f} | "
        f"{f(*r['table_minus_synchronous'])} |", "",
        f"table - policy: {f(*r['table_minus_policy'])}", ""])


if __name__ == "__main__":
    main()
