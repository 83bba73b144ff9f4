"""Sample sheet of the testbed domain and the verifier's accuracy on rendered scenes.

    python benchmarks/testbed_samples.py outputs/testbed_samples.png --n 500 --sizes 32 64

Writes a PNG grid (one row per category; train prompts, then held-out test prompts; each cell
shows the image at every size with the prompt and the verifier's score) and prints JSON: per
size and category, the all-correct rate and mean score over ``n`` rendered scenes (categories
drawn uniformly), the mean score under degradations (gaussian noise, blur, a colour swap, and a
"decoder-like" mix of mild blur, noise and per-object colour drift) and the verifier's speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from tpm.testbed import BACKGROUND, CATEGORIES, COLORS, Verifier, render, sample_prompts

_BG = np.array(BACKGROUND, np.float32)


def recolour(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Paint every pixel of colour ``src`` (anti-aliased mixes included) in colour ``dst``."""
    d = np.array(COLORS[src], np.float32) - _BG
    a = np.clip(((arr - _BG) @ d) / (d @ d), 0, 1)[..., None]
    resid = np.linalg.norm(arr - (_BG + a * d), axis=-1, keepdims=True)
    hit = (a > 0.05) & (resid < 20)
    out = np.where(hit, _BG + a * (np.array(COLORS[dst], np.float32) - _BG), arr)
    return out


def degradations(size: int, rng: np.random.Generator, spec) -> dict:
    """name -> function(float array (H, W, 3)) -> float array."""
    def noise(s):
        return lambda a: a + rng.normal(0, s, a.shape)

    def blur(r):
        return lambda a: np.asarray(
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(r)), np.float32
        )

    def swap(a):
        named = [o.color for o in spec.objects if o.color is not None]
        if not named:
            return a
        others = [c for c in COLORS if c not in named]
        return recolour(a, named[0], others[int(rng.integers(len(others)))])

    def decoder_like(a):
        # each palette colour drifts by up to +-25 per channel, then 0.5 px blur and noise 8
        out = a.copy()
        for c in COLORS:
            d = np.array(COLORS[c], np.float32) - _BG
            w = np.clip(((a - _BG) @ d) / (d @ d), 0, 1)[..., None]
            near = np.linalg.norm(a - (_BG + w * d), axis=-1, keepdims=True) < 20
            out = out + np.where(near & (w > 0.05), w * rng.uniform(-25, 25, 3), 0)
        return noise(8)(blur(0.5 * size / 32)(out))

    return {
        "noise_20": noise(20), "noise_40": noise(40), "noise_60": noise(60),
        "blur_1px_at_32": blur(size / 32), "blur_2px_at_32": blur(2 * size / 32),
        "colour_swap": swap, "decoder_like": decoder_like,
    }


def evaluate(n: int, size: int, seed: int, verifier: Verifier) -> dict:
    items = sample_prompts(n, seed=seed)
    rng = np.random.default_rng(seed)
    ok = {c: [] for c in CATEGORIES}
    score = {c: [] for c in CATEGORIES}
    degraded: dict[str, list[float]] = {}
    t_verify = 0.0
    for i, it in enumerate(tqdm(items, desc=f"verify {size}px", file=sys.stderr)):
        arr = np.asarray(render(it.spec, size, seed=i), np.float32)
        t0 = time.perf_counter()
        res = verifier.verify(arr / 255.0, it.spec)
        t_verify += time.perf_counter() - t0
        ok[it.category].append(res.all_correct)
        score[it.category].append(res.score)
        for name, f in degradations(size, rng, it.spec).items():
            img = np.clip(f(arr), 0, 255) / 255.0
            degraded.setdefault(name, []).append(verifier.verify(img, it.spec).score)
    return {
        "n": {c: len(v) for c, v in ok.items()},
        "all_correct": {c: round(float(np.mean(v)), 4) for c, v in ok.items()},
        "all_correct_overall": round(float(np.mean([x for v in ok.values() for x in v])), 4),
        "score": {c: round(float(np.mean(v)), 4) for c, v in score.items()},
        "degraded_mean_score": {"clean": round(float(np.mean([x for v in score.values() for x in v])), 4)}
        | {k: round(float(np.mean(v)), 4) for k, v in degraded.items()},
        "verify_ms_per_image": round(1000 * t_verify / max(n, 1), 2),
    }


def sheet(path: Path, sizes: list[int], cols: int, seed: int, verifier: Verifier) -> None:
    cell, caption = 128, 34
    n_held = max(1, cols // 3)
    width = cols * (cell * len(sizes) + 8)
    img = Image.new("RGB", (width, len(CATEGORIES) * (cell + caption + 6) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, cat in enumerate(CATEGORIES):
        items = sample_prompts(cols - n_held, cat, "train", seed + r) + sample_prompts(n_held, cat, "test", seed + r)
        for c, it in enumerate(items):
            x0, y0 = c * (cell * len(sizes) + 8) + 4, r * (cell + caption + 6) + 4
            scores = []
            for k, s in enumerate(sizes):
                im = render(it.spec, s, seed=seed + 31 * r + c)
                scores.append(verifier.verify(im, it.spec).score)
                img.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (x0 + k * cell, y0))
            split = "train" if c < cols - n_held else "TEST"
            words = it.prompt.split()
            half = (len(words) + 1) // 2
            text = f"{' '.join(words[:half])}\n{' '.join(words[half:])} [{cat}/{split}] {min(scores):.2f}"
            draw.text((x0, y0 + cell + 1), text, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="PNG path of the sample sheet")
    ap.add_argument("--n", type=int, default=500, help="rendered scenes per size for the accuracy table")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--cols", type=int, default=6, help="samples per category on the sheet")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    verifier = Verifier()
    sheet(args.out, args.sizes, args.cols, args.seed, verifier)
    result = {"sheet": str(args.out), "n": args.n, "seed": args.seed}
    result["by_size"] = {str(s): evaluate(args.n, s, args.seed, verifier) for s in args.sizes}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
