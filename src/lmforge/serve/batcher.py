"""Continuous batching of generation requests on one model with the KV cache.

One worker thread owns the models. Each iteration it

1. admits waiting requests for the model id being served (up to ``max_batch`` rows): their
   prompts are prefilled together (left-padded) into a fresh ``DynamicCache`` whose per-layer
   keys/values ``(b, H, T', D)`` are left-padded to the running cache's length and concatenated
   onto it along the batch axis (with a zero attention mask on the padding), so a request joins
   while others are mid-generation;
2. samples one token per row from that row's logits with the row's own settings (greedy or
   temperature/top-k/top-p, repetition penalty, seeded generator), streams the text that is safe
   to show (nothing that may still become a stop string), and ends rows on EOS, a stop string,
   ``max_tokens``, the context limit or a cancelled request (a client that went away);
3. drops ended rows from the cache (``batch_select_indices``) and cuts the cache's leading columns
   that no remaining row uses, so a disconnected stream frees its slot at once;
4. runs one decode step for the remaining rows: ``(B, 1)`` new tokens at each row's own position.

Rows of different model ids (base and adapters) are never in one batch: when the batch empties,
the oldest waiting request picks the next model id (first come, first served across ids). Caches
other than transformers' plain ``DynamicCache`` layers fall back to dynamic batching (requests
join only an empty batch).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..generation import GenerationConfig, cache_kwargs, next_tokens, process_logits
from ..sampling import seen_tokens
from ..streaming import cut_at_stop, held_back

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    """One generation request and its state while it runs.

    Events put on ``emit``: ``("delta", text)`` pieces, then ``("done", finish_reason, usage)``
    or ``("error", message)``.
    """

    model: str
    prompt_ids: list[int]
    max_tokens: int
    cfg: GenerationConfig
    emit: Callable[[tuple], None]
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    sent: int = 0
    seen: torch.Tensor | None = None
    generator: torch.Generator | None = None
    pos: int = 0
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Served:
    """A model id's causal LM and tokenizer."""

    model: Any
    tokenizer: Any
    eos_ids: list[int]
    pad_id: int
    max_positions: int | None


class Batcher:
    """The worker thread that decodes every generation request (see the module docstring)."""

    def __init__(self, models: dict[str, Served], placement, max_batch: int = 8):
        self.models, self.placement, self.max_batch = models, placement, max_batch
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.cond = threading.Condition()
        self.stopped = False
        self.active: list[GenRequest] = []
        self.stats = {"finished": 0, "cancelled": 0, "steps": 0, "max_rows": 0}
        self._thread = threading.Thread(target=self._run, name="lmforge-batcher", daemon=True)

    # ---- public ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self._thread.join(timeout=10)

    def submit(self, req: GenRequest) -> None:
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()

    def health(self) -> dict:
        return {"active": len(self.active), "waiting": len(self.waiting)} | self.stats

    # ---- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        cache = mask = logits = None
        current: str | None = None
        while True:
            with self.cond:
                while not self.stopped and not self.active and not self.waiting:
                    self.cond.wait(timeout=0.5)
                if self.stopped:
                    break
                if not self.active:
                    current, cache, mask, logits = None, None, None, None
                new = self._admit(current, mergeable=cache is None or _mergeable(cache))
            try:
                if new:
                    current = new[0].model
                    cache, mask, logits = self._prefill(new, cache, mask, logits)
                    self.active, new = self.active + new, []
                    self.stats["max_rows"] = max(self.stats["max_rows"], len(self.active))
                if not self.active:
                    continue
                keep = self._sample(self.models[current], logits)
                if len(keep) < len(self.active):
                    cache, mask, logits = self._drop(keep, cache, mask, logits)
                if self.active:
                    logits, mask = self._step(self.models[current], cache, mask)
            except Exception as exc:  # a failing forward must fail its requests, not the server
                log.exception("generation failed")
                for r in self.active + new:
                    r.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))
                self.active, cache, mask, logits = [], None, None, None

    def _admit(self, current: str | None, mergeable: bool) -> list[GenRequest]:
        """Waiting requests that join now (called with the lock held)."""
        for r in [r for r in self.waiting if r.cancelled.is_set()]:
            self.waiting.remove(r)
            self.stats["cancelled"] += 1
        if not self.waiting or (self.active and not mergeable):
            return []
        model = current or self.waiting[0].model
        room = self.max_batch - len(self.active)
        taken = []
        for r in list(self.waiting):
            if len(taken) >= room:
                break
            if r.model != model:
                break  # first come, first served: later requests wait behind another model id
            self.waiting.remove(r)
            taken.append(r)
        return taken

    @torch.no_grad()
    def _prefill(self, new: list[GenRequest], cache, mask, logits):
        """Run the new prompts (left-padded) and merge them into the running batch."""
        from ..generation import _new_cache

        served = self.models[new[0].model]
        model, device = served.model, next(served.model.parameters()).device
        width = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), width), served.pad_id, dtype=torch.long)
        m = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):
            n = len(r.prompt_ids)
            ids[i, width - n:] = torch.tensor(r.prompt_ids)
            m[i, width - n:] = 1
            r.pos = n
            if r.cfg.seed is not None:
                r.generator = torch.Generator(device=device).manual_seed(r.cfg.seed)
        ids, m = ids.to(device), m.to(device)
        pos = (m.cumsum(-1) - 1).clamp_min(0)
        new_cache = _new_cache(model)
        with self.placement.autocast():
            out = model(input_ids=ids, attention_mask=m, position_ids=pos, use_cache=True,
                        **cache_kwargs(model, new_cache), **_keep_last(model)).logits[:, -1, :].float()  # (b, V)
        for i, r in enumerate(new):
            if r.cfg.repetition_penalty != 1.0:
                r.seen = seen_tokens(ids[i:i + 1], m[i:i + 1], out.shape[-1])  # (1, V)
        if cache is None:
            return new_cache, m, out
        t_old, t_new = mask.shape[1], m.shape[1]
        t = max(t_old, t_new)
        for old_layer, new_layer in zip(cache.layers, new_cache.layers):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, t), _left_pad(new_layer.keys, t)], 0)
            old_layer.values = torch.cat([_left_pad(old_layer.values, t), _left_pad(new_layer.values, t)], 0)
        mask = torch.cat([_left_pad(mask, t, dim=1), _left_pad(m, t, dim=1)], 0)  # (B, T)
        return cache, mask, torch.cat([logits, out], 0)

    def _sample(self, served: Served, logits: torch.Tensor) -> list[int]:
        """One token per active row; returns the indices of rows that go on."""
        keep = []
        greedy = logits.argmax(-1).tolist()  # (B,) most rows of a typical batch are greedy
        for i, r in enumerate(self.active):
            if r.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            if r.cfg.greedy and r.seen is None:
                tok = greedy[i]
            else:
                z = process_logits(logits[i:i + 1], r.seen, r.cfg)  # (1, V)
                tok = int(next_tokens(z, r.cfg, r.generator)[0])
            if r.seen is not None:
                r.seen[0, tok] = True
            r.generated.append(tok)
            finish = self._advance(served, r, tok)
            if finish is None:
                keep.append(i)
            else:
                usage = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.generated),
                         "total_tokens": len(r.prompt_ids) + len(r.generated)}
                r.emit(("done", finish, usage))
                self.stats["finished"] += 1
        return keep

    def _advance(self, served: Served, r: GenRequest, tok: int) -> str | None:
        """Stream the safe new text of ``r``; the finish reason when the row ends, else None."""
        eos = tok in served.eos_ids and not r.ignore_eos
        ids = r.generated[:-1] if eos else r.generated
        text = served.tokenizer.decode(ids, skip_special_tokens=True)
        text, hit = cut_at_stop(text, r.cfg.stop)
        room = served.max_positions is not None and r.pos + 1 >= served.max_positions
        done = eos or hit or len(r.generated) >= r.max_tokens or room
        safe = len(text) if done else len(text) - held_back(text, r.cfg.stop)
        if safe > r.sent:
            r.emit(("delta", text[r.sent:safe]))
            r.sent = safe
        if eos or hit:
            return "stop"
        return "length" if done else None

    def _drop(self, keep: list[int], cache, mask, logits):
        self.active = [self.active[i] for i in keep]
        if not keep:
            return None, None, None
        idx = torch.tensor(keep, device=mask.device)
        cache.batch_select_indices(idx)
        mask, logits = mask[idx], logits[idx]
        lead = int((mask.cumsum(1) == 0).sum(1).min())  # columns no remaining row uses
        if lead and _mergeable(cache):
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            mask = mask[:, lead:]
        return cache, mask, logits

    @torch.no_grad()
    def _step(self, served: Served, cache, mask):
        model = served.model
        device = mask.device
        tokens = torch.tensor([[r.generated[-1]] for r in self.active], device=device)  # (B, 1)
        pos = torch.tensor([[r.pos] for r in self.active], device=device)  # (B, 1)
        mask = torch.cat([mask, mask.new_ones(len(self.active), 1)], 1)  # (B, T + 1)
        with self.placement.autocast():
            logits = model(input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=True,
                           **cache_kwargs(model, cache), **_keep_last(model)).logits[:, -1, :].float()  # (B, V)
        for r in self.active:
            r.pos += 1
        self.stats["steps"] += 1
        return logits, mask


def _left_pad(x: torch.Tensor, t: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad ``x`` on the left of ``dim`` to length ``t``."""
    n = x.shape[dim]
    if n == t:
        return x
    shape = list(x.shape)
    shape[dim] = t - n
    return torch.cat([x.new_zeros(shape), x], dim)


def _mergeable(cache) -> bool:
    """Whether the cache's layers are plain ``(B, H, T, D)`` key/value tensors we can pad and join."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(l).__name__ == "DynamicLayer" and getattr(l, "keys", None) is not None
                                and l.keys.dim() == 4 for l in layers)


_KEEP: dict[int, dict] = {}


def _keep_last(model) -> dict:
    key = id(model)
    if key not in _KEEP:
        from ..generation import _accepts

        _KEEP[key] = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    return _KEEP[key]


def async_emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[tuple], None]:
    """A thread-safe ``emit`` that puts events on an asyncio queue of ``loop``."""
    def emit(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down)
            pass
    return emit
