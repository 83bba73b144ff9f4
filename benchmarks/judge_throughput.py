"""Throughput of the ``vlm_judge`` reward against a judge that takes a fixed time per request.

Starts the loopback judge (``rewards.loopback_judge``, the testbed verifier behind the
chat-completions protocol) with ``--delay`` seconds of sleep per request, scores ``--images`` testbed
images at each ``--concurrency`` level, and prints JSON: images per second (median of ``--repeats``),
the speed-up over concurrency 1, and the ideal (``min(concurrency, images) / delay``, what a server
with unlimited parallelism and free encoding would allow). Every run's scores are checked to be
the same. Usage: ``python benchmarks/judge_throughput.py [--delay 0.1] [--images 32] [--concurrency 1,8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from tqdm import tqdm


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay", type=float, default=0.1, help="seconds the judge sleeps per request")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    import rewards
    from rewards.loopback_judge import MODEL, LoopbackJudge
    from tpm.testbed import get_split, render

    prompts = [item.prompt for item in get_split("val")[: args.images]]
    images = [render(pr, 64, seed=i) for i, pr in enumerate(prompts)]
    levels = [int(c) for c in args.concurrency.split(",")]
    results, reference = {}, None
    with LoopbackJudge(delay=args.delay) as judge:
        for c in tqdm(levels, desc="concurrency"):
            reward = rewards.load("vlm_judge", url=judge.url, model=MODEL, concurrency=c)
            times = []
            for _ in range(args.repeats):
                judge.max_in_flight = 0
                t = time.perf_counter()
                scores = reward(images, prompts).tolist()
                times.append(time.perf_counter() - t)
                reference = reference or scores
                if scores != reference:
                    raise SystemExit(f"scores at concurrency {c} differ from the first run")
            sec = statistics.median(times)
            results[str(c)] = {"seconds": round(sec, 3), "images_per_s": round(len(images) / sec, 2),
                               "ideal_images_per_s": round(min(c, len(images)) / args.delay, 2),
                               "max_in_flight_seen_by_server": judge.max_in_flight}
    base = results[str(levels[0])]["images_per_s"]
    for r in results.values():
        r["speedup_vs_first"] = round(r["images_per_s"] / base, 2)
    report = {"benchmark": "vlm_judge throughput vs concurrency (loopback judge, fixed delay per request)",
              "delay_s": args.delay, "images": len(images), "image_size": 64, "repeats": args.repeats,
              "mean_score": round(sum(reference) / len(reference), 3), "results": results,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
