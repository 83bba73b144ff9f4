"""Train a tiny testbed backbone (Flux or SD3 classes) on the procedural shapes domain.

    accelerate launch recipes/train_testbed.py --backbone flux --timestep-sampler sync \
        --output-dir outputs/testbed-flux
    accelerate launch recipes/train_testbed.py --backbone flux --timestep-sampler controlled \
        --vae-path outputs/testbed-flux/vae --output-dir outputs/testbed-flux-asyncpatch

Optionally ``--config file.yaml`` (keys = the flags' field names) with command-line overrides.
Writes ``<output-dir>/pipeline`` (an ordinary diffusers pipeline + testbed.json), ``vae/`` when it
trained one, ``samples_*.png`` per epoch, tensorboard logs and ``train_report.json``; prints the
report as JSON. Everything reusable lives in ``tpm.testbed.train``.
"""

from __future__ import annotations

import json
import sys

from transformers import HfArgumentParser

from tpm.testbed.train import TrainTestbedConfig, train_testbed


def parse_args(argv: list[str]) -> TrainTestbedConfig:
    parser = HfArgumentParser(TrainTestbedConfig)
    if len(argv) >= 2 and argv[0] == "--config":
        import yaml

        with open(argv[1]) as f:
            defaults = yaml.safe_load(f) or {}
        parser.set_defaults(**defaults)
        argv = argv[2:]
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    report = train_testbed(cfg)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
