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

Only the text tokens a policy reads need maps (AsynDM reads the object words': a few of 512 T5
tokens at Flux scale). ``tokens`` selects them per sample, so the extra cost becomes
``Q_img . K_sel^T`` with a handful of columns instead of the whole text block; the other text
positions of the returned maps are zero.

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
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention plus the head-averaged text->image probabilities.

    Args:
        q, k, v: (B, H, L, d) after every projection/normalisation/rotary the model applies.
        img, txt: the image and text token ranges along L.
        method: "lse" (kernel log-sum-exp), "onehot" (augmented V), or "auto" (lse if available).
        tokens: (B, P) long, positions within the text range whose maps are wanted (per sample);
            ``None`` for every text token.
    Returns:
        out: (B, H, L, d) the attention output (what the stock processor computes);
        probs: (B, N_img, P) joint-softmax probabilities averaged over heads (float32); P is the
        number of text tokens when ``tokens`` is ``None``.
    """
    scale = q.shape[-1] ** -0.5
    res = _sdpa_with_lse(q, k, v, scale) if method in ("auto", "lse") else None
    if res is None and method == "lse":
        raise RuntimeError(f"no log-sum-exp attention kernel for {q.device.type}/{q.dtype}")
    b, h, length, d = v.shape
    if res is not None:
        out, lse = res
        k_txt = k[:, :, txt]
        if tokens is not None:
            k_txt = k_txt.gather(2, tokens[:, None, :, None].expand(b, h, tokens.shape[1], d))
        s = torch.matmul(q[:, :, img].float(), k_txt.float().transpose(-1, -2)) * scale
        probs = torch.exp(s - lse[:, :, img, None])
        return out, probs.mean(dim=1)
    # One-hot route: out_aug[..., d + j] = sum_l P[i, l] * 1[l = txt_j] = P[i, txt_j].
    txt_pos = torch.arange(length, device=v.device)[txt]
    if tokens is None:
        n_sel = txt_pos.numel()
        onehot = torch.zeros(length, n_sel, dtype=v.dtype, device=v.device)
        onehot[txt_pos, torch.arange(n_sel, device=v.device)] = 1
        onehot = onehot.expand(b, h, length, n_sel)
    else:
        n_sel = tokens.shape[1]
        onehot = torch.zeros(b, length, n_sel, dtype=v.dtype, device=v.device)
        cols = torch.arange(n_sel, device=v.device).expand(b, n_sel)
        rows = torch.arange(b, device=v.device)[:, None].expand(b, n_sel)
        onehot[rows, txt_pos[tokens], cols] = 1
        onehot = onehot[:, None].expand(b, h, length, n_sel)
    v_aug = torch.cat([v, onehot], dim=-1)
    out_aug = F.scaled_dot_product_attention(q, k, v_aug, scale=scale)
    return out_aug[..., :d], out_aug[:, :, img, d:].float().mean(dim=1)


def brute_force_text_probs(q: torch.Tensor, k: torch.Tensor, img: slice, txt: slice) -> torch.Tensor:
    """Reference: materialise the full joint softmax and slice it (tests only)."""
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale, dim=-1)
    return p[:, :, img, txt].mean(dim=1).float()


class AttentionRecorder:
    """Accumulates head-averaged text->image maps over the captured layers of one forward.

    ``tokens``: per sample, the text positions whose maps are computed (``None``: all of them).
    Samples may ask for different numbers of positions; the index is padded with the sample's
    first position (or 0) and the padding is dropped again in :meth:`result`.
    """

    def __init__(self, layers: list[int] | None, tokens: list[list[int]] | None = None):
        self.layers = set(layers or [])
        self.tokens = None if tokens is None else [list(t) for t in tokens]
        self._index: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0

    def wants(self, layer: int) -> bool:
        return layer in self.layers

    def index(self, device) -> torch.Tensor | None:
        """(B, P) long positions for :func:`attention_with_text_probs`, or ``None`` for all tokens."""
        if self.tokens is None:
            return None
        if self._index is None:
            width = max(1, max((len(t) for t in self.tokens), default=1))
            rows = [t + [t[0] if t else 0] * (width - len(t)) for t in self.tokens]
            self._index = torch.tensor(rows, dtype=torch.long)
        return self._index.to(device)

    def add(self, probs: torch.Tensor) -> None:
        self._sum = probs if self._sum is None else self._sum + probs
        self._count += 1

    def result(self, grid: tuple[int, int], n_text: int | None = None,
               image_order: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, n_text, h, w), averaged over captured layers; ``None`` when nothing was captured.

        With ``tokens``, positions that were not asked for are zero (``n_text`` is then needed).
        ``image_order``: the permutation the forward applied to the image tokens; undone here.
        """
        if self._sum is None:
            return None
        avg = self._sum / self._count  # (B, N_img, P)
        if image_order is not None:
            avg = torch.empty_like(avg).index_copy_(1, image_order, avg)
        b, n, t = avg.shape
        if self.tokens is not None:
            if n_text is None:
                raise ValueError("AttentionRecorder.result needs n_text when only some tokens were captured")
            full = avg.new_zeros(b, n, n_text)
            for i, pos in enumerate(self.tokens):
                if pos:
                    full[i, :, pos] = avg[i, :, : len(pos)]
            avg, t = full, n_text
        return avg.transpose(1, 2).reshape(b, t, grid[0], grid[1])
