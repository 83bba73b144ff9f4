"""Scoring throughput of a reward, batched vs one image per call, for a mid-size random CLIP on CPU.

Builds an open_clip CLIP from config with random weights (no download) behind the ``clipscore``
reward and prints JSON: images per second for one-by-one calls and for internal batch sizes, and
the speed-up. Usage: ``python benchmarks/bench_rewards.py [--images 16] [--repeats 2] [--out f.json]``.

``--memory`` instead prints the peak RSS of loading each reward and the composite of all four, before
(``legacy``: the pre-``rewards.lean_load`` loaders) and after (``lean``), against the bytes of the
weights (``benchmarks/reward_memory.py``); ``--size real`` is the released architectures (up to
~15 GB peak for the legacy composite), ``--size mid`` a quick stand-in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from tqdm import tqdm

MID_CLIP = {  # ViT-B/32-like at a third of the depth: big enough for batching to matter, quick on 2 cores
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 512, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 4},
}


def build_reward(batch_size: int, model, tokenizer):
    from rewards.clip_score import CLIPScore

    return CLIPScore(model=model, tokenizer=tokenizer, batch_size=batch_size)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_report(args) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
    from benchmarks.reward_memory import run

    folder = os.path.join(args.checkpoints, args.size)
    results = run(args.rewards, args.routes, folder, args.size)
    report = {
        "benchmark": f"reward loading peak RSS ({args.size} sizes, random weights in the official formats, CPU)",
        "torch": torch.__version__, "machine": platform.machine(),
        "note": "baseline = RSS after imports and tokenizers, when VmHWM is reset; load_growth_over_weights = "
                "(peak during loading - baseline) / weights; growth_over_weights = (whole-process peak - baseline) / "
                "weights; peak_over_weights = whole-process peak (load and "
                "scoring two images) / weights",
        "results": results,
    }
    _emit(report, args.out)
    return report


def _emit(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="images scored per measurement")
    p.add_argument("--repeats", type=int, default=2, help="measurements per setting (median reported)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16], help="internal batch sizes")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--memory", action="store_true", help="measure peak RSS of loading instead of throughput")
    p.add_argument("--size", choices=["real", "mid"], default="real", help="--memory: model sizes")
    p.add_argument("--rewards", nargs="+", default=["clipscore", "hpsv2", "imagereward", "pickscore", "composite"],
                   help="--memory: rewards to load (composite: all four)")
    p.add_argument("--routes", nargs="+", choices=["legacy", "lean"], default=["legacy", "lean"],
                   help="--memory: legacy = before rewards.lean_load, lean = now")
    p.add_argument("--checkpoints", default=os.path.join(tempfile.gettempdir(), "tpm_bench_reward_checkpoints"),
                   help="--memory: folder for the random-weight checkpoints (kept for reruns; ~14 GB at real size)")
    args = p.parse_args(argv)
    if args.memory:
        return memory_report(args)

    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(MID_CLIP["embed_dim"], open_clip.CLIPVisionCfg(**MID_CLIP["vision_cfg"]),
                           open_clip.CLIPTextCfg(**MID_CLIP["text_cfg"])).eval()
    tokenizer = open_clip.SimpleTokenizer(context_length=77)
    n_params = sum(q.numel() for q in model.parameters())
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, 256, 256, generator=g)
    prompts = [f"a photo of object number {i}" for i in range(args.images)]

    one = build_reward(1, model, tokenizer)
    one(images[:2], prompts[:2])  # warm-up

    def one_by_one():
        for i in range(args.images):
            one(images[i:i + 1], prompts[i])

    results = {"one_by_one": args.images / timed(one_by_one, args.repeats)}
    ref = torch.cat([one(images[i:i + 1], prompts[i]) for i in range(args.images)])
    max_diff = 0.0
    for bs in tqdm(args.batch_sizes, desc="batch sizes"):
        reward = build_reward(bs, model, tokenizer)
        results[f"batch_{bs}"] = args.images / timed(lambda r=reward: r(images, prompts), args.repeats)
        max_diff = max(max_diff, float((reward(images, prompts) - ref).abs().max()))
    best = max(v for k, v in results.items() if k != "one_by_one")
    report = {
        "benchmark": "reward scoring throughput (clipscore, random mid-size open_clip CLIP, CPU)",
        "model": MID_CLIP, "params_millions": round(n_params / 1e6, 1),
        "images": args.images, "input_size": [256, 256], "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__, "machine": platform.machine(),
        "images_per_s": {k: round(v, 2) for k, v in results.items()},
        "speedup_best_batch_vs_one_by_one": round(best / results["one_by_one"], 2),
        "max_abs_diff_batched_vs_one_by_one": max_diff,
    }
    _emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
