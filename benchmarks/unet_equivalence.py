"""The UNet equivalence table: synchronous ``tpm.sample`` against ``pipe(...)``; prints a table and JSON.

For random tiny ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (fp32) with each
scheduler that tpm applies per pixel and both prediction types, the max abs difference of the
decoded images (in [0, 1]) and of the final latents (relative to their largest value), at equal
noise (same generator), CFG 3 and 4 steps. The same cases are asserted (<= 1e-5) by
``tests/core/test_unet_backbone.py``. Multistep schedulers (PNDM, SD 1.5's default) are listed as
refused, with the error tpm raises.

    python benchmarks/unet_equivalence.py [--steps 4]
"""

from __future__ import annotations

import argparse
import json

import torch

from tpm.backbones import BackboneError
from tpm.tiny import compare_to_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a red circle left of a blue square", "two green triangles"]
CASES = [(cls, sched, pred) for cls in ("sd", "sdxl") for sched in ("ddim", "euler", "ddpm")
         for pred in ("epsilon", "v_prediction")] + [("sd", "pndm", "epsilon")]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for cls, sched, pred in CASES:
        build = tiny_sd_pipeline if cls == "sd" else tiny_sdxl_pipeline
        pipe = build(prediction_type=pred, scheduler=sched)
        row = {"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "prediction_type": pred}
        try:
            row.update(compare_to_pipeline(pipe, PROMPTS, steps=args.steps))
        except BackboneError as e:
            row["refused"] = str(e).split(";")[0]
        rows.append(row)
    print(f"{'class':28s} {'scheduler':24s} {'prediction':13s} {'max|d| image':>13s} {'max|d| latent (rel)':>20s}")
    for r in rows:
        if "refused" in r:
            print(f"{r['class']:28s} {r['scheduler']:24s} {r['prediction_type']:13s} refused: {r['refused']}")
        else:
            print(f"{r['class']:28s} {r['scheduler']:24s} {r['prediction_type']:13s} {r['image']:13.2e} "
                  f"{r['latent_rel']:20.2e}")
    print(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
