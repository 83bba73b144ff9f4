"""Train a timestep policy on Flux with GRPO (AsyncDiff §3.3) and report it against fixed schedules.

    accelerate launch recipes/grpo_flux.py                         # the embedded testbed, minutes on a CPU
    accelerate launch recipes/grpo_flux.py --preset testbed_tpm    # AsyncDiff's TPM instead
    accelerate launch recipes/grpo_flux.py --preset flux_dev       # the paper's setting
    accelerate launch recipes/grpo_flux.py --output-dir outputs/run --resume

The same as ``tpm train`` (``accelerate launch -m tpm train``): this script only names its default
preset, ``grpo_flux`` (``tpm/presets/grpo_flux.yaml``: the learned field policy at 3 steps on the
shipped testbed Flux, warm-started on the best fixed schedule, then GRPO on the testbed verifier).
Every config key is a flag (``--help``); the keys: ``tpm.app.recipe.RecipeConfig`` and ``tpm.grpo.GRPOConfig``.
The run itself is three calls (``tpm.app.train.run``): ``run = build(cfg, prepare(cfg))``, then
``GRPOTrainer(run.cfg.grpo, run.policy, run.pipe, run.reward, ...).train()``, then ``finish(run, trainer)``.
"""

from __future__ import annotations

from tpm.app.train import main

if __name__ == "__main__":
    main(defaults="grpo_flux", description=__doc__.splitlines()[0])
