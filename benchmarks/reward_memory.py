"""Peak RSS of loading each reward model, and the composite of all four, against the bytes of its weights.

Checkpoints are written once with random weights in the official formats (no download): open_clip's
``open_clip_model.safetensors`` for clipscore, ``HPS_v2.1_compressed.pt`` (``{"state_dict": ...}``)
for hpsv2, the official ``ImageReward.pt`` names for imagereward and a ``save_pretrained`` CLIPModel
folder for pickscore; ``--size real`` is the released architectures (ViT-H-14, ImageReward-v1.0,
CLIP-H), ``--size mid`` a small stand-in for tests. Each measurement runs in its own process: imports
and tokenizers first, then ``VmHWM`` is reset (``/proc/self/clear_refs``, Linux) and the reward loads
and scores two images. Two routes: ``lean`` is the rewards package as it is; ``legacy`` rebuilds the
models the way the package did before ``rewards.lean_load`` (random-weight model, then a copying
``load_state_dict``), so before and after come from one tree.

Used by ``benchmarks/bench_rewards.py --memory`` and ``tests/rewards/test_lean_load.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARDS = ("clipscore", "hpsv2", "imagereward", "pickscore")
MID_CLIP_NAME = "tpm-bench-mid-clip"
SIZES = {
    "real": {
        "open_clip": "ViT-H-14",
        "imagereward": {},  # ImageRewardConfig defaults: the release
        "pickscore": {  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the base of PickScore_v1
            "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                            "num_attention_heads": 16, "max_position_embeddings": 77, "vocab_size": 49408},
            "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                              "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
            "projection_dim": 1024,
        },
    },
    "mid": {
        "open_clip": MID_CLIP_NAME,
        "imagereward": {"vision_width": 256, "vision_layers": 4, "vision_heads": 4, "image_size": 64,
                        "patch_size": 16, "text_width": 256, "text_layers": 4, "text_heads": 4,
                        "text_intermediate": 1024},
        "pickscore": {
            "text_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "max_position_embeddings": 77, "vocab_size": 49408},
            "vision_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                              "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
            "projection_dim": 256,
        },
    },
}
MID_CLIP = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 512, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 4},
}
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "grass"]


# -- /proc ---------------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def reset_peak() -> float:
    """Reset VmHWM to the current RSS and return that RSS (MB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


# -- checkpoints -----------------------------------------------------------------------------------
def _register_mid_clip(folder: str) -> None:
    import open_clip

    path = os.path.join(folder, f"{MID_CLIP_NAME}.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(MID_CLIP, f)
    open_clip.add_model_config(folder)


def files(folder: str) -> dict[str, str]:
    return {"clipscore": os.path.join(folder, "clip", "open_clip_model.safetensors"),
            "hpsv2": os.path.join(folder, "hps", "HPS_v2.1_compressed.pt"),
            "imagereward": os.path.join(folder, "ir", "ImageReward.pt"),
            "pickscore": os.path.join(folder, "pick")}


def write_checkpoint(kind: str, folder: str, size: str) -> None:
    """Write one family of random-weight checkpoints (``open_clip``: clipscore and hpsv2 share one model)."""
    import torch

    torch.manual_seed(0)
    paths = files(folder)
    if kind == "open_clip":
        import open_clip
        from safetensors.torch import save_file

        _register_mid_clip(folder)
        model = open_clip.create_model(SIZES[size]["open_clip"], pretrained=None)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        for name in ("clipscore", "hpsv2"):
            os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
        save_file(state, paths["clipscore"])
        torch.save({"state_dict": state}, paths["hpsv2"])
    elif kind == "imagereward":
        from rewards.imagereward import ImageRewardConfig

        cfg = ImageRewardConfig(**SIZES[size]["imagereward"])
        state = {}
        for k, shape in cfg.official_shapes().items():
            state[k] = (torch.arange(shape[1])[None] if k.endswith("position_ids")
                        else torch.randn(shape) / shape[-1] ** 0.5)
        os.makedirs(os.path.dirname(paths["imagereward"]), exist_ok=True)
        torch.save(state, paths["imagereward"])
    elif kind == "pickscore":
        from transformers import CLIPConfig, CLIPModel

        CLIPModel(CLIPConfig(**SIZES[size]["pickscore"])).save_pretrained(paths["pickscore"])
    else:
        raise ValueError(kind)


def ensure_checkpoints(folder: str, size: str, targets=REWARDS) -> None:
    """Write the missing checkpoints of ``targets``, each family in its own process (they are as big as
    the models)."""
    os.makedirs(folder, exist_ok=True)
    paths = files(folder)
    names = set(REWARDS if "composite" in targets else targets)
    needed = {"open_clip": paths["hpsv2"], "imagereward": paths["imagereward"],
              "pickscore": os.path.join(paths["pickscore"], "config.json")}
    family = {"clipscore": "open_clip", "hpsv2": "open_clip", "imagereward": "imagereward", "pickscore": "pickscore"}
    for kind, marker in needed.items():
        if kind in {family[n] for n in names} and not os.path.exists(marker):
            _run([sys.executable, __file__, "write", kind, folder, size])


# -- one measurement -------------------------------------------------------------------------------
def _tokenizers(folder: str) -> dict:
    import open_clip
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    vocab = os.path.join(folder, "bert_vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    bert = BertTokenizer(vocab)
    bert.add_special_tokens({"bos_token": "[DEC]"})
    bert.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    words = {t: i for i, t in enumerate(["<pad>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    clip_tok = open_clip.SimpleTokenizer(context_length=77)
    return {"clipscore": clip_tok, "hpsv2": clip_tok, "imagereward": bert,
            "pickscore": PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")}


def _legacy_model(name: str, path: str, size: str):
    """The model as the package built it before rewards.lean_load (commit 42cb563)."""
    import open_clip
    import torch

    if name == "clipscore":
        return open_clip.create_model_and_transforms(SIZES[size]["open_clip"], pretrained=path)[0]
    if name == "hpsv2":
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        model = open_clip.create_model(SIZES[size]["open_clip"], pretrained=None)
        model.load_state_dict(state, strict=False)
        return model
    if name == "imagereward":
        from rewards.imagereward import ImageRewardConfig, ImageRewardNet

        state = torch.load(path, map_location="cpu", weights_only=True)
        model = ImageRewardNet(ImageRewardConfig(**SIZES[size]["imagereward"]))
        model.load_official_state_dict(state)
        return model
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(path)


def _reward(name: str, route: str, folder: str, size: str, tokenizer):
    import rewards

    path = files(folder)[name]
    options = {"clipscore": {"model_name": SIZES[size]["open_clip"], "pretrained": path},
               "hpsv2": {"model_name": SIZES[size]["open_clip"], "checkpoint": path},
               "imagereward": {"checkpoint": path, "config": SIZES[size]["imagereward"]},
               "pickscore": {"model_id": path}}[name]
    if route == "legacy":
        options = {k: v for k, v in options.items() if k in ("model_name", "config")}
        options["model"] = _legacy_model(name, path, size)
    return rewards.load(name, tokenizer=tokenizer, **options)


def measure(target: str, route: str, folder: str, size: str) -> dict:
    """Load ``target`` (a reward name or ``composite``) by ``route`` in this process and report memory."""
    import torch

    from rewards.composite import Composite
    from rewards.lean_load import weight_bytes

    torch.set_num_threads(2)
    if size == "mid":
        _register_mid_clip(folder)
    tokenizers = _tokenizers(folder)
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat", "a red car on grass"]
    names = list(REWARDS) if target == "composite" else [target]
    # Import the model classes before the baseline (transformers imports them lazily, ~40 MB): the
    # peak is then the load's alone.
    from transformers import BlipTextModel, BlipVisionModel, CLIPModel  # noqa: F401

    baseline = reset_peak()
    built = {}
    for name in names:  # the composite loads its rewards one after the other, as on its first call
        built[name] = _reward(name, route, folder, size, tokenizers[name])
        built[name]._ensure_loaded()
    load_peak = peak_mb()
    weights = sum(weight_bytes(r.model) for r in built.values()) / 2**20
    scores = Composite({n: 1.0 for n in names}, rewards=built)(images, prompts).total
    return {
        "reward": target, "route": route, "weights_mb": round(weights, 1),
        "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak_mb(), 1),
        "load_peak_rss_mb": round(load_peak, 1),
        "load_growth_over_weights": round((load_peak - baseline) / weights, 3),
        "growth_over_weights": round((peak_mb() - baseline) / weights, 3),
        "peak_over_weights": round(peak_mb() / weights, 3),
        "scores_finite": bool(torch.isfinite(scores).all()),
    }


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def run(targets, routes, folder: str, size: str) -> list[dict]:
    """Each (target, route) in a fresh process, one at a time (their peaks must not overlap)."""
    ensure_checkpoints(folder, size, targets)
    results = []
    for target in targets:
        for route in routes:
            line = _run([sys.executable, __file__, "measure", target, route, folder, size]).strip().splitlines()[-1]
            results.append(json.loads(line))
    return results


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write_checkpoint(*sys.argv[2:5])
    elif sys.argv[1] == "measure":
        print(json.dumps(measure(*sys.argv[2:6])))
    else:
        raise SystemExit("usage: reward_memory.py write KIND FOLDER SIZE | measure TARGET ROUTE FOLDER SIZE")
