"""Next-token probabilities, the logit lens, per-layer [MASK] fills, attention maps, KV-cache timing.

Logit lens (nostalgebraist 2020): the residual stream after layer ``l`` is read out as if it were the
last layer, through the model's final norm and LM head::

    p_l(· | x_{≤t}) = softmax(softcap(W_U · norm_f(h_l[t]) + b_U)),   l = 0 (embeddings) .. L

so ``p_L`` is the model's own next-token distribution. The final norm and head are found
generically (:func:`decoder_parts`): the decoder's stack of blocks is the ``ModuleList`` with
``num_hidden_layers`` entries, the final norm the last norm module registered after it (``norm``,
``ln_f``, ``final_layer_norm``), the head ``get_output_embeddings()``; Gemma-2/3 style
``final_logit_softcapping`` (``c·tanh(z/c)``) is applied when the config sets it.

For encoders (BERT-style masked LMs) the same question is asked of every layer by replacing the
last layer's output with layer ``l``'s: whatever follows (a final norm, the MLM transform and
decoder) then reads layer ``l``, and the fills at each ``[MASK]`` are reported per layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import LmforgeError

MASK = "[MASK]"


# ---- pure pieces ---------------------------------------------------------------------------------
def next_token_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(z / T)`` over the last dimension, in fp32 (T = 1: the model's own distribution).

    Args:
        logits: (..., V).
        temperature: T > 0.
    Returns:
        (..., V) probabilities, each row summing to 1.
    """
    if not temperature > 0:
        raise LmforgeError(f"--temperature must be > 0, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """``c · tanh(z / c)`` (Gemma 2/3's final logit soft-capping); identity when ``cap`` is None."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def top_tokens(probs: Tensor, k: int, tokenizer) -> list[dict]:
    """The ``k`` most likely tokens of a (V,) distribution: ``[{"id", "token", "prob"}]``."""
    top = probs.topk(min(k, probs.numel()))
    return [{"id": i, "token": tokenizer.decode([i]), "prob": p}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]


def _first(out):
    """The hidden states of a block's output (a tensor, or a tuple whose first item is one)."""
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- finding the parts ---------------------------------------------------------------------------
@dataclass
class Parts:
    """The pieces of a transformer the lens needs."""

    layers: nn.ModuleList
    norm: nn.Module | None      # final norm (decoders), None when the stack has none after it
    head: nn.Module | None      # the LM head (decoders)
    cap: float | None = None    # final_logit_softcapping


def block_stack(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of transformer blocks (``num_hidden_layers`` entries, else the longest)."""
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [m for m in lists if len(m) == n]
    if exact:
        return exact[0]
    if not lists:
        raise LmforgeError(f"{type(model).__name__}: no stack of transformer blocks found")
    return max(lists, key=len)


def decoder_parts(model: nn.Module) -> Parts:
    """Blocks, final norm and LM head of a causal LM (Llama, Gemma, GPT-2 ...)."""
    head = model.get_output_embeddings()
    if head is None:
        raise LmforgeError(f"{type(model).__name__} has no LM head")
    layers = block_stack(model)
    parent = next((m for m in model.modules() if any(c is layers for c in m.children())), None)
    norm, after = None, False
    for _, child in (parent.named_children() if parent is not None else []):
        if child is layers:
            after = True
        elif after and ("norm" in type(child).__name__.lower() or isinstance(child, nn.LayerNorm)):
            norm = child
    return Parts(layers=layers, norm=norm, head=head, cap=getattr(model.config, "final_logit_softcapping", None))


def check_layer_head(n_layers: int, n_heads: int, layer: int, head: int) -> tuple[int, int]:
    """Validate a layer/head choice (negative counts from the end); returns non-negative indices."""
    if not -n_layers <= layer < n_layers:
        raise LmforgeError(f"--layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if not -n_heads <= head < n_heads:
        raise LmforgeError(f"--head {head} is out of range: layer has {n_heads} attention heads (0..{n_heads - 1})")
    return layer % n_layers, head % n_heads


# ---- forward passes ------------------------------------------------------------------------------
@torch.no_grad()
def residual_states(model: nn.Module, layers: nn.ModuleList, input_ids: Tensor) -> tuple[list[Tensor], Tensor]:
    """The residual stream entering block 0 and leaving each block, and the model's own logits.

    Args:
        input_ids: (1, T).
    Returns:
        ``([h_0, ..., h_L], logits)``: L + 1 tensors (1, T, H) and the model's logits (1, T, V).
    """
    seen: list[Tensor] = []

    def before(_m, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    hooks = [layers[0].register_forward_pre_hook(before, with_kwargs=True)]
    hooks += [blk.register_forward_hook(lambda _m, _a, out: seen.append(_first(out))) for blk in layers]
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def lens_logits(parts: Parts, hidden: Tensor) -> Tensor:
    """``softcap(head(norm(h)))``: (..., H) -> (..., V) fp32."""
    h = parts.norm(hidden) if parts.norm is not None else hidden
    return softcap(parts.head(h).float(), parts.cap)


@dataclass
class Lens:
    """Top-k readouts of every layer at every position."""

    tokens: list[str]             # the input tokens (T)
    top: list[list[list[dict]]]   # [layer 0..L][position][k] {"id", "token", "prob"}
    final_ids: list[int]          # the model's own argmax at each position (T)
    final_rank: list[list[int]]   # [layer][position]: rank of the model's final argmax in layer l's readout
    max_diff: float               # max |p_L - p_model|: 0 up to rounding when the parts were found right


@torch.no_grad()
def logit_lens(model: nn.Module, tokenizer, input_ids: Tensor, k: int = 5) -> Lens:
    """The logit lens of a causal LM on ``input_ids`` (1, T); ``Lens.top[l][t]`` is layer l's guess
    for token t + 1 (l = 0 is the embedding layer, l = L the model's output)."""
    parts = decoder_parts(model)
    states, logits = residual_states(model, parts.layers, input_ids)
    own = next_token_probs(logits[0])  # (T, V)
    final = own.argmax(-1)  # (T,)
    top, ranks, diff = [], [], 0.0
    for i, h in enumerate(states):
        probs = next_token_probs(lens_logits(parts, h)[0])  # (T, V)
        top.append([top_tokens(row, k, tokenizer) for row in probs])
        ranks.append((probs > probs.gather(-1, final[:, None])).sum(-1).tolist())
        if i == len(states) - 1:
            diff = float((probs - own).abs().max())
    names = [tokenizer.decode([t]) for t in input_ids[0].tolist()]
    return Lens(tokens=names, top=top, final_ids=final.tolist(), final_rank=ranks, max_diff=diff)


@dataclass
class Step:
    """One greedy step: the distribution over the next token and the token chosen."""

    text: str                 # the continuation so far
    chosen: dict              # {"id", "token", "prob"} (argmax)
    top: list[dict]           # top-k at T = 1
    top_t: list[dict] | None  # top-k at the given temperature (None when T = 1)
    entropy: float            # nats, at T = 1


@torch.no_grad()
def greedy_steps(model: nn.Module, tokenizer, input_ids: Tensor, steps: int, k: int = 5,
                 temperature: float = 1.0) -> list[Step]:
    """Greedy continuation of ``input_ids`` (1, T), with the top-k next tokens at every step.

    The probabilities are shown at ``temperature`` too (``softmax(z / T)``); the greedy choice does not
    depend on it. Each step recomputes the whole sequence (prompts here are short).
    """
    ids = input_ids
    out: list[Step] = []
    for _ in range(steps):
        z = model(input_ids=ids, use_cache=False).logits[0, -1].float()  # (V,)
        p = next_token_probs(z)
        top = top_tokens(p, k, tokenizer)
        entropy = float(-(p * p.clamp_min(1e-30).log()).sum())
        top_t = top_tokens(next_token_probs(z, temperature), k, tokenizer) if temperature != 1.0 else None
        ids = torch.cat([ids, ids.new_tensor([[top[0]["id"]]])], dim=1)
        text = tokenizer.decode(ids[0, input_ids.shape[1]:].tolist())
        out.append(Step(text=text, chosen=top[0], top=top, top_t=top_t, entropy=entropy))
    return out


@torch.no_grad()
def attention(model: nn.Module, input_ids: Tensor, layer: int, head: int) -> Tensor:
    """Attention weights of one head: (T, T), row i = how query token i spreads over keys.

    The model runs with eager attention for this call (the fused kernels return no weights), then gets
    its own kernel back.
    """
    before = getattr(model.config, "_attn_implementation", None)
    switch = hasattr(model, "set_attn_implementation") and before not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        out = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    finally:
        if switch:
            model.set_attn_implementation(before)
    maps = getattr(out, "attentions", None)
    if not maps:
        raise LmforgeError(f"{type(model).__name__} returns no attention weights")
    layer, head = check_layer_head(len(maps), maps[0].shape[1], layer, head)
    return maps[layer][0, head].float()  # (T, T)


# ---- encoders -----------------------------------------------------------------------------------
@torch.no_grad()
def mask_fills_per_layer(model: nn.Module, tokenizer, text: str, k: int = 5) -> tuple[list[int], list[list[list[dict]]]]:
    """Top-k fills of every mask, read from every layer of a masked LM.

    ``[MASK]`` in ``text`` stands for the tokenizer's own mask token. Layer ``l``'s readout replaces
    the last block's output by block ``l``'s (l = 0: the embeddings), so the rest of the model
    (final norm, MLM head) reads it; the last readout is the model's own prediction.

    Returns:
        ``(mask positions, fills[layer][mask][k])``.
    """
    if tokenizer.mask_token is None:
        raise LmforgeError("the tokenizer has no mask token: [MASK] fills need a masked-LM tokenizer")
    if model.get_output_embeddings() is None:
        raise LmforgeError(f"{type(model).__name__} has no masked-LM head: only --views attention works for it")
    text = text.replace(MASK, tokenizer.mask_token)
    enc = tokenizer(text, return_tensors="pt", truncation=True)
    where = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero(as_tuple=True)[0].tolist()
    if not where:
        raise LmforgeError(f"no mask in the text: write {MASK} where a word is missing")
    device = next(model.parameters()).device
    enc = {k_: v.to(device) for k_, v in enc.items()}
    layers = block_stack(model)
    states: list[Tensor] = []
    hooks = [layers[0].register_forward_pre_hook(lambda _m, a, kw: states.append(a[0] if a else kw["hidden_states"]),
                                                 with_kwargs=True)]
    hooks += [blk.register_forward_hook(lambda _m, _a, out: states.append(_first(out))) for blk in layers]
    try:
        model(**enc)
    finally:
        for h in hooks:
            h.remove()
    fills = []
    for h_l in states:
        def swap(_m, _a, out, h_l=h_l):
            return (h_l, *out[1:]) if isinstance(out, tuple) else h_l

        hook = layers[-1].register_forward_hook(swap)
        try:
            logits = model(**enc).logits[0].float()  # (T, V)
        finally:
            hook.remove()
        fills.append([top_tokens(torch.softmax(logits[p], -1), k, tokenizer) for p in where])
    return where, fills


# ---- KV cache -----------------------------------------------------------------------------------
@dataclass
class Timing:
    """Milliseconds per generated token with and without the KV cache."""

    cached_ms: list[float] = field(default_factory=list)    # step 1 includes the prompt
    uncached_ms: list[float] = field(default_factory=list)
    same_tokens: bool = True

    def summary(self) -> dict:
        def mean(x):
            return sum(x) / len(x) if x else float("nan")

        return {"tokens": len(self.cached_ms), "cached_first_ms": self.cached_ms[0] if self.cached_ms else None,
                "cached_ms_per_token": mean(self.cached_ms[1:]), "uncached_ms_per_token": mean(self.uncached_ms[1:]),
                "uncached_last_ms": self.uncached_ms[-1] if self.uncached_ms else None,
                "speedup": mean(self.uncached_ms[1:]) / max(mean(self.cached_ms[1:]), 1e-9),
                "same_tokens": self.same_tokens}


def kv_timing(model: nn.Module, input_ids: Tensor, new_tokens: int) -> Timing:
    """Greedy-decode ``new_tokens`` tokens with and without the KV cache (lmforge's own decoding
    loop) and time every step. Without the cache step t recomputes all T + t positions; with it,
    one position attends to the cached keys/values."""
    from ..generation import GenerationConfig, decode

    res = Timing()
    got = {}
    for use_cache, sink in ((True, res.cached_ms), (False, res.uncached_ms)):
        cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache)
        last = [time.perf_counter()]

        def tick(_row, _ids, sink=sink, last=last):
            now = time.perf_counter()
            sink.append((now - last[0]) * 1000)
            last[0] = now
            return False

        got[use_cache] = decode(model, input_ids, torch.ones_like(input_ids), cfg, on_token=tick)[0]
    res.same_tokens = got[True] == got[False]
    return res
