"""Load reward weights holding about one copy of them in memory.

The plain route (build the model with random weights, read the checkpoint into a state dict, copy it
into the model) holds two full copies at its peak: about 2x the weights, 8 GB for a ViT-H-14. Here
the model is built without weights (parameters on the meta device: no memory, no random init), the
checkpoint is read once, and its tensors become the parameters (``load_state_dict(assign=True)``):
the peak is the checkpoint plus the small buffers. A checkpoint stored in another dtype than the
reward's is converted afterwards, one tensor at a time, so that peak stays one copy of the larger dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rewards.base import RewardError


@contextmanager
def empty_model() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real.

    Non-persistent buffers (causal masks, position ids) are not in checkpoints, so they keep the values
    the constructor gave them, even when the builder moves the whole model to the meta device (open_clip's
    ``create_model(device="meta")`` does): they are put back when the block ends.
    """
    from accelerate import init_empty_weights

    kept: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    original = torch.nn.Module.register_buffer

    def register_buffer(module, name, tensor, persistent=True):
        original(module, name, tensor, persistent)
        if tensor is not None and not persistent:
            kept.append((module, name, tensor))

    torch.nn.Module.register_buffer = register_buffer
    try:
        with init_empty_weights(include_buffers=False):
            yield
    finally:
        torch.nn.Module.register_buffer = original
        for module, name, tensor in kept:
            current = module._buffers.get(name)
            if current is not None and current.is_meta and not tensor.is_meta:
                module._buffers[name] = tensor


@contextmanager
def assigning(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Make ``model.load_state_dict`` assign the given tensors instead of copying them, for loaders we
    do not own (open_clip's ``load_checkpoint``) that call it on our empty model."""
    model.load_state_dict = functools.partial(type(model).load_state_dict, model, assign=True)
    try:
        yield model
    finally:
        del model.load_state_dict


def check_loaded(model: torch.nn.Module, what: str, source: str) -> None:
    """Raise one clear error if any parameter or buffer was left without a value by the checkpoint."""
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise RewardError(f"{what}: checkpoint {source!r} has no values for {empty[:5]}"
                          + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
                          + f"; is it a {what} checkpoint?")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.data_ptr()) if not t.is_meta else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
