"""Train a timestep policy on Flux with GRPO (AsyncDiff §3.3).

    accelerate launch recipes/grpo_flux.py                       # the embedded testbed, minutes on a CPU
    accelerate launch recipes/grpo_flux.py --config recipes/configs/flux_dev.yaml   # the paper's setting
    accelerate launch recipes/grpo_flux.py --output-dir outputs/run --resume

Defaults: TPM on the shipped testbed Flux (``tpm.testbed.load_pipeline("flux")``), rewarded by the
testbed verifier, prompts from the testbed train split, reward before/after on the val split.
Everything else lives in ``tpm.grpo`` (see ``tpm/grpo/recipe.py`` for the config keys).
"""

from __future__ import annotations

import sys

from tpm.grpo import GRPOConfig
from tpm.grpo.recipe import RecipeConfig, main

# Sized to finish in a few minutes on a 2-core CPU with the tiny testbed Flux (32x32 images).
DEFAULTS = RecipeConfig(
    model="testbed:flux",
    policy="tpm",
    policy_options={"width": 64, "heads": 4, "layers": 4, "image_grid": 4},
    rewards={"testbed": 1.0},
    train_prompts="testbed:train",
    eval_prompts="testbed:val",
    grpo=GRPOConfig(
        output_dir="outputs/grpo_flux", max_iterations=100, group_size=8, batch_size=16, rollout_batch_size=16,
        minibatch_size=4, epochs=1, learning_rate=3e-4, num_inference_steps=10, eval_prompts=128,
        save_every=10,
    ),
)


if __name__ == "__main__":
    main(sys.argv[1:], DEFAULTS, description=__doc__.splitlines()[0])
