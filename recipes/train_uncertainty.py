"""Train a per-patch uncertainty head on a frozen backbone (AsyncPatch §5.5).

    accelerate launch recipes/train_uncertainty.py                        # the testbed (tiny:flux if not shipped)
    accelerate launch recipes/train_uncertainty.py --model testbed:flux-asyncpatch --output-dir outputs/unc
    accelerate launch recipes/train_uncertainty.py --model stabilityai/stable-diffusion-3.5-medium \
        --num-prompts 256 --num-steps 28 --train-steps 2000

Optionally ``--config file.yaml`` (keys = the flags' field names) with command-line overrides.
Writes ``<output-dir>/head`` (config.json + model.safetensors), tensorboard logs,
``uncertainty_maps.png`` and ``report.json``; prints the report. Use the head with
``policies.UncertaintyPatches.with_head("<output-dir>/head")``. Everything reusable lives in
``policies.uncertainty_head``.
"""

from __future__ import annotations

import json
import os
import sys

from transformers import HfArgumentParser

from policies.uncertainty_head import TrainUncertaintyConfig, train_uncertainty


def parse_args(argv: list[str]) -> TrainUncertaintyConfig:
    parser = HfArgumentParser(TrainUncertaintyConfig)
    if len(argv) >= 2 and argv[0] == "--config":
        import yaml

        with open(argv[1]) as f:
            parser.set_defaults(**(yaml.safe_load(f) or {}))
        argv = argv[2:]
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    report = train_uncertainty(cfg)
    with open(os.path.join(cfg.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
