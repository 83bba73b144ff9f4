"""Parameter-name mapping from the official ImageReward checkpoint to our transformers port.

The official model (THUDM/ImageReward, ``ImageReward.pt``) is ``ImageReward`` with submodules
``blip.visual_encoder`` (BLIP's timm-style ViT), ``blip.text_encoder`` (BLIP's "med" BERT with
cross-attention, no pooler), ``blip.vision_proj`` / ``blip.text_proj`` (unused when scoring) and
``mlp.layers`` (Linear layers at indices 0, 2, 4, 6, 7 of a Sequential with dropouts between).
Our port (``rewards.imagereward.ImageRewardNet``) holds ``vision`` (``BlipVisionModel``), ``text``
(``BlipTextModel`` without pooler) and ``mlp.layers``.

The mapping is data (``RULES``: regex on the official name -> template of our name; ``IGNORED``:
official keys that scoring does not use) so it can be read and tested on its own.
``official_shapes`` lists the official names and shapes for a given size, derived from the
official architecture (not from our port), so a test can check that the mapping covers every
parameter of the port exactly once with equal shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

V = r"blip\.visual_encoder\."
T = r"blip\.text_encoder\."
WB = r"(weight|bias)"

RULES: list[tuple[str, str]] = [
    # Vision transformer (BLIP vit.py names -> transformers BlipVisionModel names).
    (V + r"cls_token", r"vision.embeddings.class_embedding"),
    (V + r"pos_embed", r"vision.embeddings.position_embedding"),
    (V + r"patch_embed\.proj\." + WB, r"vision.embeddings.patch_embedding.\1"),
    (V + r"blocks\.(\d+)\.norm1\." + WB, r"vision.encoder.layers.\1.layer_norm1.\2"),
    (V + r"blocks\.(\d+)\.attn\.qkv\." + WB, r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (V + r"blocks\.(\d+)\.attn\.proj\." + WB, r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (V + r"blocks\.(\d+)\.norm2\." + WB, r"vision.encoder.layers.\1.layer_norm2.\2"),
    (V + r"blocks\.(\d+)\.mlp\.(fc1|fc2)\." + WB, r"vision.encoder.layers.\1.mlp.\2.\3"),
    (V + r"norm\." + WB, r"vision.post_layernorm.\1"),
    # BERT with cross-attention: transformers' BLIP text model keeps med's names.
    (T + r"(embeddings\.(?:word_embeddings|position_embeddings|LayerNorm)\.(?:weight|bias))", r"text.\1"),
    (T + r"(encoder\.layer\.\d+\.(?:attention|crossattention)\.self\.(?:query|key|value)\.(?:weight|bias))",
     r"text.\1"),
    (T + r"(encoder\.layer\.\d+\.(?:attention|crossattention)\.output\.(?:dense|LayerNorm)\.(?:weight|bias))",
     r"text.\1"),
    (T + r"(encoder\.layer\.\d+\.(?:intermediate|output)\.dense\.(?:weight|bias))", r"text.\1"),
    (T + r"(encoder\.layer\.\d+\.output\.LayerNorm\.(?:weight|bias))", r"text.\1"),
    # Reward head.
    (r"mlp\.layers\.([02467])\." + WB, r"mlp.layers.\1.\2"),
]

IGNORED: list[str] = [
    T + r"embeddings\.position_ids",  # a buffer, recomputed by the port
    r"blip\.(?:vision_proj|text_proj)\.(?:weight|bias)",  # contrastive heads, unused for the reward
]

MLP_SIZES = (1024, 128, 64, 16, 1)


class MappingError(ValueError):
    """The checkpoint does not match the port (unknown, missing or mis-shaped parameters)."""


def map_name(official: str) -> str | None:
    """Our parameter name for an official one; None when the key is ignored.

    Raises :class:`MappingError` for a key no rule knows.
    """
    for pattern, template in RULES:
        m = re.fullmatch(pattern, official)
        if m:
            return m.expand(template)
    if any(re.fullmatch(p, official) for p in IGNORED):
        return None
    raise MappingError(f"no mapping for official ImageReward parameter {official!r}")


def convert_state_dict(official: Mapping[str, torch.Tensor],
                       target_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Rename an official state dict to the port's names, checking completeness and shapes.

    ``target_shapes``: the port's parameter names -> shapes. Every official key must be mapped or
    ignored, every port parameter must receive exactly one tensor, and shapes must agree; otherwise
    one :class:`MappingError` lists all problems.
    """
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in official.items():
        try:
            name = map_name(key)
        except MappingError as e:
            problems.append(str(e))
            continue
        if name is None:
            continue
        if name not in target_shapes:
            problems.append(f"{key!r} maps to {name!r}, which the port does not have")
        elif tuple(value.shape) != tuple(target_shapes[name]):
            problems.append(f"{key!r} has shape {tuple(value.shape)}, port {name!r} expects "
                            f"{tuple(target_shapes[name])}")
        elif name in out:
            problems.append(f"two official keys map to {name!r}")
        else:
            out[name] = value
    missing = sorted(set(target_shapes) - set(out))
    if missing:
        problems.append(f"port parameters with no official key: {missing[:10]}"
                        + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if problems:
        raise MappingError("ImageReward checkpoint does not match the port:\n  " + "\n  ".join(problems[:20]))
    return out


def official_shapes(*, vision_width: int, vision_layers: int, image_size: int, patch_size: int,
                    text_width: int, text_layers: int, text_intermediate: int, vocab_size: int,
                    max_positions: int, embed_dim: int = 256, mlp_ratio: float = 4.0) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official ImageReward state dict for the given sizes.

    Written from the official module structure (BLIP ViT, med BERT, MLP head), independently of
    the port, so that tests can check the mapping against both sides.
    """
    s: dict[str, tuple[int, ...]] = {}
    d, n = vision_width, (image_size // patch_size) ** 2
    v = "blip.visual_encoder."
    s[v + "cls_token"] = (1, 1, d)
    s[v + "pos_embed"] = (1, n + 1, d)
    s[v + "patch_embed.proj.weight"] = (d, 3, patch_size, patch_size)
    s[v + "patch_embed.proj.bias"] = (d,)
    hidden = int(d * mlp_ratio)
    for i in range(vision_layers):
        b = f"{v}blocks.{i}."
        s[b + "norm1.weight"] = s[b + "norm1.bias"] = (d,)
        s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"] = (3 * d, d), (3 * d,)
        s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = (d, d), (d,)
        s[b + "norm2.weight"] = s[b + "norm2.bias"] = (d,)
        s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = (hidden, d), (hidden,)
        s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"] = (d, hidden), (d,)
    s[v + "norm.weight"] = s[v + "norm.bias"] = (d,)

    w, t = text_width, "blip.text_encoder."
    s[t + "embeddings.word_embeddings.weight"] = (vocab_size, w)
    s[t + "embeddings.position_embeddings.weight"] = (max_positions, w)
    s[t + "embeddings.LayerNorm.weight"] = s[t + "embeddings.LayerNorm.bias"] = (w,)
    s[t + "embeddings.position_ids"] = (1, max_positions)
    for i in range(text_layers):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", w), ("crossattention", d)):
            s[f"{b}{att}.self.query.weight"], s[f"{b}{att}.self.query.bias"] = (w, w), (w,)
            for kv in ("key", "value"):
                s[f"{b}{att}.self.{kv}.weight"], s[f"{b}{att}.self.{kv}.bias"] = (w, kv_in), (w,)
            s[f"{b}{att}.output.dense.weight"], s[f"{b}{att}.output.dense.bias"] = (w, w), (w,)
            s[f"{b}{att}.output.LayerNorm.weight"] = s[f"{b}{att}.output.LayerNorm.bias"] = (w,)
        s[b + "intermediate.dense.weight"], s[b + "intermediate.dense.bias"] = (text_intermediate, w), (text_intermediate,)
        s[b + "output.dense.weight"], s[b + "output.dense.bias"] = (w, text_intermediate), (w,)
        s[b + "output.LayerNorm.weight"] = s[b + "output.LayerNorm.bias"] = (w,)
    s["blip.vision_proj.weight"], s["blip.vision_proj.bias"] = (embed_dim, d), (embed_dim,)
    s["blip.text_proj.weight"], s["blip.text_proj.bias"] = (embed_dim, w), (embed_dim,)

    sizes = (w, *MLP_SIZES)
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:]), strict=True):
        s[f"mlp.layers.{idx}.weight"], s[f"mlp.layers.{idx}.bias"] = (o, i), (o,)
    return s
