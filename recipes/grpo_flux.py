"""Train a timestep policy on Flux with GRPO (AsyncDiff §3.3) and report it against fixed schedules.

    accelerate launch recipes/grpo_flux.py                       # the embedded testbed, minutes on a CPU
    accelerate launch recipes/grpo_flux.py --config recipes/configs/testbed_tpm.yaml   # AsyncDiff's TPM instead
    accelerate launch recipes/grpo_flux.py --config recipes/configs/flux_dev.yaml      # the paper's setting
    accelerate launch recipes/grpo_flux.py --output-dir outputs/run --resume

Default: the learned field policy (``policies.FieldPolicy``) at 3 steps on the shipped testbed Flux,
with a per-sample grid move and conditioning shift, warm-started by imitating the best fixed schedule
of the headroom study (``benchmarks/headroom.py`` on val prompts: a grid shifted by 2), then GRPO with
groups of 16 samples that share one noise, rewarded by the testbed verifier. The exported policy is
the one of the evaluation (every 200 iterations, and the start) with the best reward on the val
prompts (``keep_best``). It reports, on the val prompts with the same noises, the synchronous sampler
at 3 and 20 steps, the fixed baselines at 3 steps, and the policy before and after training. Everything else lives in ``tpm.train`` (the config
keys: ``tpm.train.RecipeConfig``) and ``tpm.grpo``.
"""

from __future__ import annotations

import sys

from tpm.grpo import GRPOConfig
from tpm.train import RecipeConfig, main

STEPS = 3  # the few-step regime, where the testbed's schedule matters (README, "Headroom")

# Sized to finish in under 10 minutes (9 min 43 s measured) on a 2-core CPU with the tiny testbed Flux (32x32 images).
DEFAULTS = RecipeConfig(
    model="testbed:flux",
    policy="field",
    # patch 4 = the whole 4x4 token grid: one grid move and one conditioning shift per sample and step.
    policy_options={"patch": 4, "token_offsets": False, "learn_cond": True, "width": 64, "layers": 2, "heads": 4},
    warm_start={"policy": "shifted_grid", "shift": 2.0},
    rewards={"testbed": 1.0},
    train_prompts="testbed:train",
    eval_prompts="testbed:val",
    # The two best fixed schedules at 3 steps in the headroom study (val); benchmarks/heldout_gain.py
    # compares with every family.
    baselines={
        "shifted grid (shift 2)": {"policy": "shifted_grid", "shift": 2.0},
        "dm_concave (w 0.5)": {"policy": "dm_concave", "weight": 0.5},
    },
    reference_steps=20,
    grpo=GRPOConfig(
        output_dir="outputs/grpo_flux", max_iterations=800, group_size=16, batch_size=64, group_noise="shared",
        rollout_batch_size=64, minibatch_size=32, epochs=1, learning_rate=3e-4, num_inference_steps=STEPS,
        eval_prompts=352, eval_noise_sets=2, eval_every=200, keep_best=True, save_every=100,
    ),
)


if __name__ == "__main__":
    main(sys.argv[1:], DEFAULTS, description=__doc__.splitlines()[0])
