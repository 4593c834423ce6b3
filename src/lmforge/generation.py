"""Text generation with our own decoding loop: logits processors, sampling and the KV cache.

Each step turns the next-token logits ``z`` (B, V) into a token per row:

1. repetition penalty (Keskar et al. 2019, CTRL, Sec. 4.1) on tokens already in the row;
2. greedy: ``argmax z`` when ``temperature == 0``; otherwise
3. temperature ``z / T``, top-k (Fan et al. 2018), top-p / nucleus (Holtzman et al. 2020),
   then one draw from ``softmax(z)`` with a seeded ``torch.Generator``.

With the KV cache (default) the prompt is run once and every later step feeds one token per
row, reusing the keys/values of the earlier positions (``DynamicCache``); without it the full
sequence is recomputed each step (the same tokens, O(T) times more work). Prompts are batched
with left padding: position ids count real tokens only, so a padded row decodes exactly as it
would alone.

Encoder-decoder models (T5, FLAN-T5, BART: ``config.is_encoder_decoder``) go through the same
loop and the same processors: the encoder runs once over the (right-aligned) prompts, the decoder
starts from ``decoder_start_token_id`` and, with the cache, feeds one token per step (self-attention
keys/values grow, cross-attention keys/values are computed once: ``EncoderDecoderCache``).
:func:`decode` and :func:`generate` take either kind; callers need not know which.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import LmforgeError
from .kv_cache import LlamaDecoder, prefill, supports
from .prompt_ids import Prompt, encode_prompts, eos_token_ids, render_chat  # noqa: F401 (public here too)
from .streaming import TextTracker
from .sampling import (mask_disallowed, repetition_penalty, seen_tokens, temperature_scale,  # noqa: F401
                       top_k_filter, top_p_filter)

log = logging.getLogger(__name__)

# constrained decoding: (tokens generated so far per row, finished rows (B,)) -> allowed (B, V) bool or None
LogitsMask = Callable[[list[list[int]], Tensor], "Tensor | None"]


# ---- configuration ------------------------------------------------------------------------------
@dataclass
class GenerationConfig:
    """Decoding settings.

    Attributes:
        max_new_tokens: tokens generated at most per prompt (> 0).
        temperature: 0 selects greedy decoding; > 0 samples from ``softmax(z / T)``.
        top_k: keep the k most likely tokens before sampling (0 = off).
        top_p: keep the smallest set of tokens whose probability reaches p, in (0, 1] (1 = off).
        repetition_penalty: CTRL penalty on tokens already in the sequence (1 = off, > 1 penalises).
        stop: strings that end a generation; the returned text stops before the first one.
        seed: seed of the sampling generator (None: torch's global generator).
        use_cache: reuse keys/values across steps (KV cache); False recomputes every step.
        batch_size: prompts decoded together (left-padded).
        sampler: ``multinomial`` (``torch.multinomial``: the draws of transformers' ``generate``) or
            ``inverse_cdf`` (one uniform per row against the cumulative probabilities: the same
            distribution, another random stream, ~20x cheaper over a 49k vocabulary on a CPU).
        fast_decode: with the cache, Llama-architecture causal LMs feed their new tokens through
            :class:`~lmforge.kv_cache.LlamaDecoder` (preallocated KV cache, a lean step through the
            model's own modules, prepacked bf16 weights on a CPU); False: the model's own forward
            with transformers' ``DynamicCache`` at every step. Other models ignore it.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    use_cache: bool = True
    batch_size: int = 8
    sampler: str = "multinomial"
    fast_decode: bool = True

    def __post_init__(self):
        if self.sampler not in ("multinomial", "inverse_cdf"):
            raise LmforgeError(f"sampler must be multinomial or inverse_cdf, got {self.sampler!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise LmforgeError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise LmforgeError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise LmforgeError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise LmforgeError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise LmforgeError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LmforgeError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---- combining the logits processors (pure functions in sampling.py) --------------------------
def process_logits(logits: Tensor, seen: Tensor | None, cfg: GenerationConfig) -> Tensor:
    """Apply the configured processors in order: repetition penalty, then (sampling only)
    temperature, top-k, top-p. (B, V) -> (B, V)."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    logits = temperature_scale(logits, cfg.temperature)
    logits = top_k_filter(logits, cfg.top_k)
    return top_p_filter(logits, cfg.top_p)


def next_tokens(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> Tensor:
    """Greedy ``argmax`` or one draw from ``softmax(logits)`` per row. (B, V) -> (B,) int64."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)  # (B, V)
    if cfg.sampler == "inverse_cdf":  # token = min{i : F_i > u * F_V}, F = cumsum(p): zero-probability tokens never
        cdf = probs.cumsum(dim=-1)  # (B, V)              # win (their F_i equals the one before)
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # (B, 1)
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(cdf.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---- the decoding loop -----------------------------------------------------------------------------
def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _takes_index(model) -> bool:
    """True when ``model.forward`` declares ``logits_to_keep`` as ``int | Tensor`` (positions to keep)."""
    try:
        return "Tensor" in str(inspect.signature(model.forward).parameters["logits_to_keep"].annotation)
    except (TypeError, ValueError, KeyError):
        return False


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the keyword ``model.forward`` takes (``cache`` since transformers 5,
    ``past_key_values`` before); empty when ``cache`` is None."""
    if cache is None:
        return {}
    return {"cache" if _accepts(model, "cache") else "past_key_values": cache}


def _feed(ids: Tensor, mask: Tensor, pos: Tensor, dec: LlamaDecoder) -> Tensor:
    return dec.feed(ids, mask, pos)


class _CausalSteps:
    """Next-token logits of a causal LM over a growing left-padded batch."""

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, cfg: GenerationConfig):
        self.model = model
        self.mask = attention_mask.long()  # (B, T)
        self.positions = (self.mask.cumsum(-1) - 1).clamp_min(0)  # (B, T) real tokens count from 0
        self.keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        self.keep_index = bool(self.keep_last) and _takes_index(model)
        self.use_cache = cfg.use_cache
        self.cache = _new_cache(model) if cfg.use_cache else None
        self.fast = None  # kv_cache.LlamaDecoder after the prefill, when the model supports it
        self.fast_new = cfg.max_new_tokens - 1 if cfg.use_cache and cfg.fast_decode and supports(model) else 0
        self.ids, self.step_ids, self.step_pos = input_ids, input_ids, self.positions
        self.seen_source = (input_ids, self.mask)  # what the repetition penalty counts as already seen

    def logits(self) -> Tensor:
        if self.fast is not None:
            return self.fast.step(self.step_ids, self.step_pos)  # (B, V)
        if self.fast_new > 0:  # prefill through the lean path into the preallocated cache (distinct
            # prompts once each, a prefix all rows share once), then one-token steps
            dec = LlamaDecoder(self.model, None, self.mask, self.fast_new)
            logits, _, _ = prefill(_feed, self.step_ids, self.mask, self.step_pos, dec)
            self.fast, self.cache = dec, None
            return logits
        return self._forward(self.step_ids, self.mask, self.step_pos, self.cache)

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache) -> Tensor:
        keep, width = self.keep_last, ids.shape[1]
        if self.keep_index and width > 1:  # keep=1 slices hidden[:, -1:] (a strided view), whose matmul with a
            # bf16 LM head on CPU copies the head once per row (B x H x V: 1.7 s for SmolLM2 at B=8); an
            # index tensor gathers the last row contiguously (11 ms)
            keep = {"logits_to_keep": torch.tensor([width - 1], device=ids.device)}
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=self.use_cache,
                          **cache_kwargs(self.model, cache), **keep).logits[:, -1, :].float()  # (B, V)

    def advance(self, token: Tensor) -> None:
        if self.fast is not None:
            self.step_ids, self.step_pos = token[:, None], self.step_pos[:, -1:] + 1
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(token.shape[0], 1)], dim=1)  # (B, T + 1)
        next_pos = self.step_pos[:, -1:] + 1  # (B, 1)
        if self.cache is not None:
            self.step_ids, self.step_pos = token[:, None], next_pos
        else:
            self.ids = torch.cat([self.ids, token[:, None]], dim=1)  # (B, T + 1)
            self.positions = torch.cat([self.positions, next_pos], dim=1)
            self.step_ids, self.step_pos = self.ids, self.positions


class _Seq2SeqSteps:
    """Next-token logits of an encoder-decoder model: the encoder runs once, the decoder grows."""

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, cfg: GenerationConfig):
        from .causal_lm import decoder_start_id, right_align

        ids, mask = right_align(input_ids, attention_mask)  # (B, S): encoders read right-padded rows
        self.model, self.mask = model, mask
        self.encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)  # last_hidden_state (B, S, H)
        start = torch.full((ids.shape[0], 1), decoder_start_id(model), dtype=torch.long, device=ids.device)
        self.dec = self.step = start  # (B, 1)
        self.use_cache = cfg.use_cache
        self.cache = _new_seq2seq_cache(model) if cfg.use_cache else None
        self.seen_source = (start, torch.ones_like(start))  # as transformers: the decoder's own tokens

    def logits(self) -> Tensor:
        return self.model(encoder_outputs=self.encoded, attention_mask=self.mask, decoder_input_ids=self.step,
                          use_cache=self.use_cache, **cache_kwargs(self.model, self.cache)
                          ).logits[:, -1, :].float()  # (B, V)

    def advance(self, token: Tensor) -> None:
        self.dec = torch.cat([self.dec, token[:, None]], dim=1)  # (B, t + 1)
        self.step = token[:, None] if self.cache is not None else self.dec


def _new_seq2seq_cache(model):
    from transformers import DynamicCache, EncoderDecoderCache

    try:
        return EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    except TypeError:  # older transformers
        return EncoderDecoderCache(DynamicCache(), DynamicCache())


def is_seq2seq(model) -> bool:
    """True for an encoder-decoder model (``config.is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


@torch.no_grad()
def decode(model, input_ids: Tensor, attention_mask: Tensor, cfg: GenerationConfig, *,
           eos_ids: Sequence[int] = (), pad_id: int = 0, generator: torch.Generator | None = None,
           on_token: Callable[[int, list[int]], bool] | None = None,
           logits_mask: LogitsMask | None = None) -> list[list[int]]:
    """Generate up to ``cfg.max_new_tokens`` tokens for each left-padded row.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, ...).logits``) or an
            encoder-decoder model (its encoder reads the prompts once; the decoder generates).
        input_ids: (B, T) prompts, left-padded.
        attention_mask: (B, T), 0 on the padding.
        cfg: decoding settings (``use_cache`` selects the KV-cache path).
        eos_ids: tokens that end a row (kept as its last token).
        pad_id: token fed to rows that have finished.
        generator: sampling generator.
        on_token: called as ``on_token(row, row_ids)`` after each new token of a running row;
            returning True ends that row (stop strings, streaming).
        logits_mask: called as ``logits_mask(out, done)`` before each step's processors with the
            tokens generated so far (B lists) and the finished rows (B,); returns the allowed
            tokens (B, V) bool (constrained decoding), or None for no constraint this step.
            Disallowed logits become ``-inf`` before the repetition penalty, top-k and top-p.

    Returns:
        B lists of generated token ids (an EOS, when hit, is the last element).
    """
    device = input_ids.device
    batch = input_ids.shape[0]
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    steps = (_Seq2SeqSteps if is_seq2seq(model) else _CausalSteps)(model, input_ids, attention_mask, cfg)
    seen = None
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    out: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(cfg.max_new_tokens):
        logits = steps.logits()  # (B, V)
        if logits_mask is not None:
            allowed = logits_mask(out, done)  # (B, V) bool or None
            if allowed is not None:
                logits = mask_disallowed(logits, allowed)
        if cfg.repetition_penalty != 1.0 and seen is None:
            seen = seen_tokens(*steps.seen_source, logits.shape[-1])  # (B, V)
        token = next_tokens(process_logits(logits, seen, cfg), cfg, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        if seen is not None:
            seen[torch.arange(batch, device=device)[~done], token[~done]] = True
        hit_eos = torch.isin(token, eos) & ~done if eos.numel() else torch.zeros_like(done)
        for row, (tok, stop_now) in enumerate(zip(token.tolist(), hit_eos.tolist())):
            if done[row]:
                continue
            out[row].append(tok)
            if stop_now or (on_token is not None and on_token(row, out[row])):
                done[row] = True
        if bool(done.all()):
            break
        steps.advance(token)
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def generate(model, tokenizer, prompts: Sequence[Prompt], cfg: GenerationConfig, *, chat: bool | None = None,
             stream: Callable[[str], None] | None = None,
             constraint: Callable[[int], LogitsMask] | None = None) -> list[str]:
    """Generate a completion for each prompt.

    Prompts are sorted by length and decoded in left-padded batches of ``cfg.batch_size``; the
    results come back in the input order. Run inside ``Placement.autocast()`` for mixed precision.

    Args:
        model: a causal LM or an encoder-decoder (seq2seq) model, in eval mode.
        tokenizer: its tokenizer (a pad token is not required).
        prompts: texts, or chat message lists (``[{"role", "content"}, ...]``).
        cfg: decoding settings.
        chat: apply the chat template to text prompts; None = when the tokenizer has one.
        stream: called with each new piece of text as it is decoded (a single prompt only).
        constraint: constrained decoding; called once per batch with its row count, it returns
            the ``logits_mask`` for :func:`decode` (e.g. ``lmforge.prompting.constrained``).

    Returns:
        The generated texts (without the prompt, the EOS token and any stop string).
    """
    if not prompts:
        raise LmforgeError("no prompts to generate from")
    if stream is not None and len(prompts) != 1:
        raise LmforgeError("streaming works with a single prompt")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    encoded = encode_prompts(tokenizer, prompts, chat)
    device = _device(model)
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seq2seq = is_seq2seq(model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[str] = [""] * len(encoded)
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start:start + cfg.batch_size]
        width = len(encoded[rows[0]])
        step_cfg = cfg
        if max_pos:
            if width > max_pos or (width == max_pos and not seq2seq):
                raise LmforgeError(f"prompt {rows[0] + 1} has {width} tokens; the model takes at most {max_pos}")
            room = max_pos - 1 if seq2seq else max_pos - width  # seq2seq: the decoder's own positions
            if cfg.max_new_tokens > room:
                log.warning("generation capped at %d new tokens (model context %d)", room, max_pos)
                step_cfg = dataclasses.replace(cfg, max_new_tokens=room)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (b, T) left-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(encoded[i])
            ids[r, width - n:] = torch.tensor(encoded[i])
            mask[r, width - n:] = 1
        tracker = TextTracker(tokenizer, eos, cfg.stop, stream)
        hook = tracker.on_token if (cfg.stop or stream is not None) else None
        out = decode(model, ids.to(device), mask.to(device), step_cfg, eos_ids=eos, pad_id=pad,
                     generator=generator, on_token=hook,
                     logits_mask=constraint(len(rows)) if constraint is not None else None)
        for r, i in enumerate(rows):
            results[i] = tracker.final(r, out[r])
    return results
