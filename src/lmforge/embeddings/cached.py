"""GradCache: in-batch contrastive losses whose batch is not bounded by activation memory.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".
An in-batch loss ``L(e_1, ..., e_N)`` couples all N embeddings, so the batch cannot be split
into independent micro-batches. GradCache splits the *encoder* work instead:

1. ``e_i = f_theta(x_i)`` for every mini-batch without keeping graphs (memory O(mini-batch));
2. ``g_i = dL/de_i`` with the embeddings as leaves (cheap: no encoder in the graph);
3. on backward, each mini-batch is re-embedded with the RNG state of step 1 (same dropout
   masks) and back-propagated with the surrogate ``sum_i <f_theta(x_i), c g_i>``, where ``c``
   is the incoming gradient of the loss (the engine's accumulation weight). Summed over
   mini-batches this is ``c dL/dtheta = c sum_i (de_i/dtheta)^T g_i``: the gradient of the
   plain loss, exactly.

The returned tensor behaves like the plain loss for the engine: ``(w * loss).backward()``
fills the parameter gradients.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch import Tensor


class _RngState:
    """CPU (and current CUDA device) RNG state, restorable without disturbing the global stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        """Run the block with this RNG state; the global RNG is untouched afterwards."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _device_of(features: dict) -> torch.device:
    return next(v.device for v in features.values() if isinstance(v, Tensor))


def cached_embedding_loss(embed: Callable[[dict], Tensor], columns: Sequence[Sequence[dict]],
                          loss_fn: Callable[[list[Tensor]], Tensor]) -> Tensor:
    """The value of ``loss_fn([E_1, ..., E_C])`` with GradCache gradients (see the module doc).

    Args:
        embed: maps one mini-batch of features to ``(b, D)`` embeddings with grad enabled.
            It must set up its own autocast: the re-embedding runs during ``backward``.
        columns: per input column (anchor, positive, negatives ...), its mini-batches, in order;
            column ``c``'s embeddings ``E_c`` are the mini-batch outputs concatenated, ``(B, D)``.
        loss_fn: the in-batch loss on the list of column embeddings; returns a 0-dim tensor.

    Returns:
        0-dim tensor equal to the plain loss; backward through it accumulates ``dL/dtheta``
        (scaled by the incoming gradient) into the parameters ``embed`` uses.
    """
    states: list[list[_RngState]] = []
    reps: list[Tensor] = []
    for col in columns:
        col_states, parts = [], []
        for mb in col:
            col_states.append(_RngState(_device_of(mb)))
            with torch.no_grad():
                parts.append(embed(mb).detach())  # (b, D)
        states.append(col_states)
        reps.append(torch.cat(parts).requires_grad_())  # (B, D) leaf
    with torch.enable_grad():
        loss = loss_fn(reps)
        grads = torch.autograd.grad(loss, reps)  # C x (B, D)

    out = loss.detach().requires_grad_()

    def _backward(grad_out: Tensor) -> None:
        for col, col_states, g in zip(columns, states, grads):
            start = 0
            for mb, state in zip(col, col_states):
                with state.replay(), torch.enable_grad():
                    e = embed(mb)  # (b, D), same dropout as the cached pass
                n = e.shape[0]
                torch.autograd.backward(e, g[start:start + n].to(e.dtype) * grad_out.to(e.dtype))
                start += n

    out.register_hook(_backward)
    return out


def split_features(features: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    """Cut a right-padded token batch into mini-batches of ``size`` rows, each trimmed to its own length.

    Args:
        features: ``input_ids``/``attention_mask`` (and other per-token keys), each ``(B, T)``.
        size: rows per mini-batch.

    Returns:
        Mini-batches in row order; a mini-batch's width is its longest row.
    """
    mask = features["attention_mask"]  # (B, T)
    out = []
    for s in range(0, mask.shape[0], size):
        width = int(mask[s:s + size].sum(1).max())
        out.append({k: v[s:s + size, :width] for k, v in features.items()})
    return out
