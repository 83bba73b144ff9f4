"""Train a timestep policy on SD3 / SD3.5 with GRPO (AsyncDiff §3.3).

    accelerate launch recipes/grpo_sd3.py                          # the embedded testbed, minutes on a CPU
    accelerate launch recipes/grpo_sd3.py --preset sd35_medium     # the paper's setting
    accelerate launch recipes/grpo_sd3.py --output-dir outputs/run --resume

The same as ``tpm train --preset grpo_sd3``: this script only names its default preset
(``tpm/presets/grpo_sd3.yaml``: AsyncDiff's TPM on the shipped testbed SD3, rewarded by the testbed
verifier). Every config key is a flag (``--help``).
"""

from __future__ import annotations

from tpm.app.train import main

if __name__ == "__main__":
    main(defaults="grpo_sd3", description=__doc__.splitlines()[0])
