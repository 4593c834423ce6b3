"""Rollout fast paths: generation with the adapters folded into copies of the base weights.

Sampling runs one small forward per new token; with LoRA every adapted projection then costs a
base GEMM plus two thin ones (``x A^T``, ``(x A^T) B^T``) and their dispatch, about a quarter of
the generation time of SmolLM2 on a CPU. :func:`merged_adapters` folds each mergeable adapter into
a *copy* of its base weight for the duration of a block, ``W' = W + scale * B A`` (LoRA; each
kind's own merge), so the block runs plain linear layers; on exit every base weight is the
original tensor again (bit for bit: the copy is dropped, nothing is un-merged by subtraction,
which would not round-trip in bf16). The adapters' own weights are not touched.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def mergeable_layers(model: nn.Module) -> list | None:
    """The adapter layers to fold, or None when the model has an adapter that cannot be merged
    (prompt tuning, bottleneck...) or one that is disabled or already merged."""
    from ..adapters.base import AdapterLayer, ModelAdapter, adapter_modules

    layers = []
    for _, m in adapter_modules(model, (AdapterLayer, ModelAdapter)):
        if not isinstance(m, AdapterLayer) or not m.mergeable or m.disabled or m.merged:
            return None
        layers.append(m)
    return layers or None


@contextmanager
def merged_adapters(model: nn.Module):
    """Run a block (generation, no gradients) with every adapter folded into a copy of its base
    weight. Yields True when folded, False when the model has nothing (or something unmergeable)
    to fold; the model is then used as it is."""
    import torch

    from ..adapters.lora import LoraLinear
    from ..kv_cache import drop_packed

    layers = mergeable_layers(model)
    if layers is None:
        yield False
        return
    saved = []
    try:
        with torch.no_grad():
            for m in layers:
                w = m.base_weight()  # (out, in), the parameter itself
                saved.append((m, w, w.data))
                if isinstance(m, LoraLinear):  # W' = W + scale * B A in one GEMM in W's dtype (a bf16 merge
                    # through fp32 costs ~10 ms a matrix on one core, as much as the adapters it saves)
                    dt = w.dtype
                    w.data = torch.addmm(w.data, m.lora_B.weight.to(dt), m.lora_A.weight.to(dt), alpha=m.scale)
                    m.merged = True
                else:
                    w.data = w.data.clone()
                    m.merge()  # in place into the copy; forward now skips the adapter
        yield True
    finally:
        for m, w, original in saved:
            w.data = original
            m.merged = False
        saved.clear()
        drop_packed(model, stale_only=True)  # packed copies of the merged weights (generation's fast path)
