"""Train a timestep policy on SD3 / SD3.5 with GRPO (AsyncDiff §3.3).

    accelerate launch recipes/grpo_sd3.py                       # the embedded testbed, minutes on a CPU
    accelerate launch recipes/grpo_sd3.py --config recipes/configs/sd35_medium.yaml   # the paper's setting
    accelerate launch recipes/grpo_sd3.py --output-dir outputs/run --resume

Defaults: TPM on the shipped testbed SD3 (``tpm.testbed.load_pipeline("sd3")``), rewarded by the
testbed verifier, prompts from the testbed train split, reward before/after on the val split.
Everything else lives in ``tpm.train`` (the config keys: ``tpm.train.RecipeConfig``) and ``tpm.grpo``.
"""

from __future__ import annotations

import sys

from tpm.grpo import GRPOConfig
from tpm.train import RecipeConfig, main

# Sized to finish in a few minutes on a 2-core CPU with the tiny testbed SD3 (32x32 images).
DEFAULTS = RecipeConfig(
    model="testbed:sd3",
    policy="tpm",
    policy_options={"width": 64, "heads": 4, "layers": 4, "image_grid": 4},
    rewards={"testbed": 1.0},
    train_prompts="testbed:train",
    eval_prompts="testbed:val",
    grpo=GRPOConfig(
        output_dir="outputs/grpo_sd3", max_iterations=40, group_size=8, batch_size=16, rollout_batch_size=16,
        minibatch_size=4, epochs=1, learning_rate=3e-4, num_inference_steps=10, eval_prompts=32,
        save_every=10,
    ),
)


if __name__ == "__main__":
    main(sys.argv[1:], DEFAULTS, description=__doc__.splitlines()[0])
