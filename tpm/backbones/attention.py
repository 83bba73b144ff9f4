"""Text->image attention maps from joint attention, exact and without the N x N matrix.

SD3 and Flux have no cross-attention module: image and text tokens attend jointly, so the
paper's cross-attention map is the image-query x text-key block of the *joint* softmax
(AsynDM App. B.3, used by Eq. 7). A softmax over the text keys alone is a different quantity.

For a query i and text key j, ``P[i, j] = exp(s_ij - lse_i)`` with ``s_ij = q_i . k_j * scale``
and ``lse_i`` the log-sum-exp of query i over *all* keys. The fused attention kernels already
compute ``lse``; PyTorch exposes it through the private ops used below, so the extra cost is
``Q_img . K_text^T`` only. Where no such op fits (other devices, dtypes), we append one-hot
columns for the text keys to V in the same attention call: the extra output columns are exactly
the joint-softmax probabilities of those keys (cost: V widened by n_text). Both routes are
checked against a brute-force softmax in the tests.

Nothing here is in diffusers: its processors return only the attention output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Attention output and per-query log-sum-exp, layout (B, H, L, d). ``None`` if unsupported."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, scale=scale
            )
            return out, lse.float()
        except (RuntimeError, AttributeError, NotImplementedError):
            return None
    if q.device.type == "cuda":
        try:
            res = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, False, scale=scale
            )
            out, lse = res[0], res[1]
            return out, lse[..., : q.shape[2]].float()
        except (RuntimeError, AttributeError, NotImplementedError):
            return None
    return None


def attention_with_text_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    img: slice,
    txt: slice,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention plus the head-averaged text->image probabilities.

    Args:
        q, k, v: (B, H, L, d) after every projection/normalisation/rotary the model applies.
        img, txt: the image and text token ranges along L.
        method: "lse" (kernel log-sum-exp), "onehot" (augmented V), or "auto" (lse if available).
    Returns:
        out: (B, H, L, d) the attention output (what the stock processor computes);
        probs: (B, N_img, N_text) joint-softmax probabilities averaged over heads (float32).
    """
    scale = q.shape[-1] ** -0.5
    res = _sdpa_with_lse(q, k, v, scale) if method in ("auto", "lse") else None
    if res is None and method == "lse":
        raise RuntimeError(f"no log-sum-exp attention kernel for {q.device.type}/{q.dtype}")
    if res is not None:
        out, lse = res
        s = torch.matmul(q[:, :, img].float(), k[:, :, txt].float().transpose(-1, -2)) * scale
        probs = torch.exp(s - lse[:, :, img, None])
        return out, probs.mean(dim=1)
    # One-hot route: out_aug[..., d + j] = sum_l P[i, l] * 1[l = txt_j] = P[i, txt_j].
    b, h, length, d = v.shape
    n_txt = len(range(length)[txt])
    onehot = torch.zeros(length, n_txt, dtype=v.dtype, device=v.device)
    onehot[txt] = torch.eye(n_txt, dtype=v.dtype, device=v.device)
    v_aug = torch.cat([v, onehot.expand(b, h, length, n_txt)], dim=-1)
    out_aug = F.scaled_dot_product_attention(q, k, v_aug, scale=scale)
    return out_aug[..., :d], out_aug[:, :, img, d:].float().mean(dim=1)


def brute_force_text_probs(q: torch.Tensor, k: torch.Tensor, img: slice, txt: slice) -> torch.Tensor:
    """Reference: materialise the full joint softmax and slice it (tests only)."""
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale, dim=-1)
    return p[:, :, img, txt].mean(dim=1).float()


class AttentionRecorder:
    """Accumulates head-averaged text->image maps over the captured layers of one forward."""

    def __init__(self, layers: list[int] | None):
        self.layers = set(layers or [])
        self._sum: torch.Tensor | None = None
        self._count = 0

    def wants(self, layer: int) -> bool:
        return layer in self.layers

    def add(self, probs: torch.Tensor) -> None:
        self._sum = probs if self._sum is None else self._sum + probs
        self._count += 1

    def result(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """(B, n_text, h, w), averaged over captured layers; ``None`` when nothing was captured."""
        if self._sum is None:
            return None
        avg = self._sum / self._count  # (B, N_img, N_text)
        b, n, t = avg.shape
        return avg.transpose(1, 2).reshape(b, t, grid[0], grid[1])
