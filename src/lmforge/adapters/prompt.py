"""Prompt tuning: N learned virtual tokens prepended to the input embeddings (Lester et al. 2021).

    E' = [P ; E(x)]           P: (N, H) trained, E: the frozen input embeddings, (B, N + T, H)

The prompt is added in place: hooks on the model's backbone (``model.base_model``, the module
that embeds tokens and runs the blocks) rewrite its inputs and strip the N virtual positions
from its outputs, so every head, loss and pooling downstream sees the T real positions as
without an adapter. What the hooks keep right, where peft's prompt methods broke for users:

- attention mask: N ones prepended; token type ids: N zeros prepended;
- explicit position ids (left padding, generation): the prompt takes 0..N-1, real tokens +N;
- packed rows (position ids restarting at 0, no attention mask): every sample gets its own
  prompt, so no sample attends to another's tokens;
- KV cache: the prompt enters the cache on the first step; later steps only shift the mask and
  positions by N;
- outputs: (B, T, ...) as without the adapter, so chunked cross-entropy, last-token pooling
  (reward models) and token classification line up with the input ids.

Encoder-decoder models (T5, BART: ``config.is_encoder_decoder``), as peft's ``SEQ_2_SEQ_LM``
prompt tuning: the prompt is prepended to the ENCODER's input embeddings only, and the encoder's
outputs keep the N prompt positions (the decoder cross-attends to them). A hook on the decoder
prepends N ones to ``encoder_attention_mask`` whenever the encoder states it receives are N longer
than that mask, so every way of running the model sees the prompt: the model's own forward, the
encoder and decoder called separately (lmforge's sft loss, generation with the encoder run once,
text2text scoring) and transformers' ``generate``. The decoder's inputs are not changed.

Initialisation: ``vocab`` (embeddings of N random vocabulary tokens), ``text`` (the embeddings
of ``init_text``'s tokens, repeated to N) or ``random`` (normal with the embeddings' std).
Saved as peft's ``PROMPT_TUNING`` (tensor ``prompt_embeddings``, (S N, H) with S =
``num_transformer_submodules``: 1 here by default; peft's seq2seq default 2 adds N rows that prompt
tuning never reads, kept so such folders load and save back unchanged).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.adapters.base import ModelAdapter
from lmforge.adapters.registry import AdapterKind, register_adapter
from lmforge.errors import LmforgeError

ATTR = "lmforge_prompt"
INITS = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}


@dataclass
class PromptSpec:
    """Prompt-tuning options.

    Attributes:
        num_virtual_tokens: N, the prompt length.
        init: ``vocab``, ``text`` or ``random`` (see the module docstring).
        init_text: the text for ``init: text``.
        num_transformer_submodules: S, rows of the saved table in units of N (peft's key). 1 (the
            default) everywhere; 2, peft's default for encoder-decoder models, only on those (the
            second N rows are saved but unused).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a head).
    """

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str | None = None
    num_transformer_submodules: int = 1
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise LmforgeError(f"prompt num_virtual_tokens must be a positive integer, got {n!r}")
        if self.init not in INITS:
            raise LmforgeError(f"prompt init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise LmforgeError("prompt init: text needs init_text")
        subs = self.num_transformer_submodules
        if subs not in (1, 2) or isinstance(subs, bool):
            raise LmforgeError(f"prompt num_transformer_submodules must be 1 or 2, got {subs!r}")
        self.modules_to_save = list(self.modules_to_save or [])


def _packed_layout(pos: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Where tokens and prompts go when every packed sample gets its own prompt.

    Args:
        pos: (B, T) position ids restarting at 0 at each sample.
        n: prompt length.

    Returns:
        ``new_idx`` (B, T): new column of each token; ``slots`` (S, N) and ``rows`` (S,): the
        prompt columns of each of the S samples and their rows; ``width`` L of the new rows.
    """
    starts = pos == 0  # (B, T)
    starts[:, 0] = True
    seg = starts.long().cumsum(1)  # (B, T) sample number, from 1
    t = pos.shape[1]
    new_idx = torch.arange(t, device=pos.device) + n * seg  # (B, T)
    rows, cols = starts.nonzero(as_tuple=True)  # (S,)
    slots = (cols + n * (seg[rows, cols] - 1))[:, None] + torch.arange(n, device=pos.device)  # (S, N)
    width = int((t + n * seg[:, -1]).max())
    return new_idx, slots, rows, width


class PromptTuning(ModelAdapter):
    """The prompt table and the backbone hooks that insert it (see the module docstring)."""

    def __init__(self, backbone: nn.Module, owner: nn.Module, weight: torch.Tensor, n: int,
                 decoder: nn.Module | None = None):
        """``backbone``: the module whose inputs get the prompt (an encoder-decoder's encoder);
        ``weight``: the (S N, H) table, the first ``n`` rows are the prompt; ``decoder``: an
        encoder-decoder's decoder (the encoder's outputs then keep the prompt positions)."""
        super().__init__()
        self.embedding = nn.Embedding(*weight.shape, device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            self.embedding.weight.copy_(weight)
        self._backbone = [backbone]  # a list: not a submodule
        self._owner = [owner]
        self._sig = inspect.signature(backbone.forward)
        self._layout: tuple | None = None
        self._n = n
        self._strips = decoder is None
        self._handles = [backbone.register_forward_pre_hook(self._before, with_kwargs=True),
                         backbone.register_forward_hook(self._after)]
        if decoder is not None:
            self._dec_sig = inspect.signature(decoder.forward)
            self._handles.append(decoder.register_forward_pre_hook(self._cross_mask, with_kwargs=True))

    @property
    def n(self) -> int:
        return self._n

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        owner = self._owner[0]
        if getattr(owner, ATTR, None) is self:
            delattr(owner, ATTR)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        self._layout = None
        if self.disabled:
            return None
        bound = self._sig.bind_partial(*args, **kwargs).arguments
        kw = dict(bound.pop("kwargs", {}) or {}) | bound
        n = self.n
        mask, pos, types = kw.get("attention_mask"), kw.get("position_ids"), kw.get("token_type_ids")
        cache = kw.get("cache", kw.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past > 0:  # decoding with a KV cache: the prompt is in the cache already
            if mask is not None and mask.dim() == 2:
                kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], 1)  # (B, N + T')
            if pos is not None:
                kw["position_ids"] = pos + n
            return (), kw
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kw["input_ids"])  # (B, T, H)
        b, t, h = embeds.shape
        prompt = self.embedding.weight[:n].to(embeds.dtype)  # (N, H)
        if pos is not None and mask is None and t > 1 and bool((pos[:, 1:] == 0).any()):
            new_idx, slots, rows, width = _packed_layout(pos, n)
            out = embeds.new_zeros(b, width, h).scatter(1, new_idx[..., None].expand(-1, -1, h), embeds)
            out = out.index_put((rows[:, None].expand_as(slots), slots), prompt.expand(len(rows), n, h))
            new_pos = torch.arange(width, device=pos.device).repeat(b, 1)  # (B, L) trailing filler restarts
            fill = new_idx[:, -1:] + 1  # (B, 1) row lengths
            new_pos = torch.where(new_pos >= fill, new_pos - fill, new_pos)
            new_pos = new_pos.scatter(1, new_idx, pos + n)
            new_pos = new_pos.index_put((rows[:, None].expand_as(slots), slots),
                                        torch.arange(n, device=pos.device).expand_as(slots))
            kw["position_ids"] = new_pos
            self._layout = new_idx
        else:
            out = torch.cat([prompt.expand(b, n, h), embeds], 1)  # (B, N + T, H)
            if mask is not None:
                kw["attention_mask"] = torch.cat([mask.new_ones(b, n), mask], 1)
            if pos is not None:
                kw["position_ids"] = torch.cat([torch.arange(n, device=pos.device).expand(pos.shape[0], n),
                                                pos + n], 1)
            self._layout = n
        if types is not None:
            kw["token_type_ids"] = torch.cat([types.new_zeros(b, n), types], 1) if self._layout == n else \
                types.new_zeros(b, out.shape[1])
        kw["input_ids"], kw["inputs_embeds"] = None, out
        return (), kw

    def _strip(self, x: torch.Tensor) -> torch.Tensor:
        layout = self._layout
        if isinstance(layout, int):
            return x[:, layout:]
        return x.gather(1, layout[..., None].expand(-1, -1, x.shape[-1]))  # (B, T, H)

    def _cross_mask(self, module: nn.Module, args: tuple, kwargs: dict):
        """Decoder pre-hook (encoder-decoder models): ``encoder_attention_mask`` (B, S) -> (B, N + S)
        when the encoder states are (B, N + S, H), i.e. came from the prompted encoder."""
        bound = self._dec_sig.bind_partial(*args, **kwargs).arguments
        kw = dict(bound.pop("kwargs", {}) or {}) | bound
        states, mask = kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")
        if states is None or mask is None or mask.dim() != 2 or states.shape[1] != mask.shape[1] + self.n:
            return None
        kw["encoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.n), mask], 1)
        return (), kw

    def _after(self, module: nn.Module, args: tuple, output):
        if self._layout is None or not self._strips:
            self._layout = None
            return None
        try:
            if isinstance(output, tuple) and not hasattr(output, "keys"):
                return (self._strip(output[0]),) + tuple(output[1:])
            output["last_hidden_state"] = self._strip(output["last_hidden_state"])
            if output.get("hidden_states") is not None:
                output["hidden_states"] = tuple(self._strip(x) for x in output["hidden_states"])
            return output
        finally:
            self._layout = None


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)) and callable(
        getattr(model, "get_encoder", None)) and callable(getattr(model, "get_decoder", None))


def _backbone(model: nn.Module) -> nn.Module:
    if is_encoder_decoder(model):
        return model.get_encoder()
    base = getattr(model, "base_model", None)
    backbone = base if isinstance(base, nn.Module) else model
    if not callable(getattr(backbone, "get_input_embeddings", None)) or backbone.get_input_embeddings() is None:
        raise LmforgeError("prompt tuning needs a model with input embeddings (get_input_embeddings())")
    return backbone


@torch.no_grad()
def initial_prompt(table: torch.Tensor, spec: PromptSpec, tokenizer=None) -> torch.Tensor:
    """The (S N, H) starting prompt from the embedding table (V, H) (S: num_transformer_submodules)."""
    n = spec.num_virtual_tokens * spec.num_transformer_submodules
    table = table.float()
    if spec.init == "vocab":
        return table[torch.randint(0, table.shape[0], (n,))].clone()
    if spec.init == "random":
        return torch.randn(n, table.shape[1], device=table.device) * table.std()
    if tokenizer is None:
        raise LmforgeError("prompt init: text needs the model's tokenizer")
    ids = tokenizer(spec.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise LmforgeError("prompt init_text has no tokens")
    ids = (ids * (n // len(ids) + 1))[:n]
    return table[torch.tensor(ids, device=table.device)].clone()


class PromptKind(AdapterKind):
    name = "prompt"
    label = "prompt"
    spec_cls = PromptSpec
    peft_type = "PROMPT_TUNING"
    required = ("num_virtual_tokens",)
    excluded_tasks = {"embed": "embed saves merged weights", "mlm": "mlm saves merged weights"}

    def apply(self, model, spec, skip, tokenizer=None) -> list[str]:
        seq2seq = is_encoder_decoder(model)
        if spec.num_transformer_submodules != 1 and not seq2seq:
            raise LmforgeError("adapter.num_transformer_submodules: 2 is for encoder-decoder models only")
        backbone = _backbone(model)
        table = backbone.get_input_embeddings().weight  # (V, H)
        setattr(model, ATTR, PromptTuning(backbone, model, initial_prompt(table, spec, tokenizer),
                                          spec.num_virtual_tokens, model.get_decoder() if seq2seq else None))
        return [ATTR]

    def peft_config(self, spec, model) -> dict:
        cfg = getattr(model, "config", None)
        dim = getattr(model, ATTR).embedding.weight.shape[1]
        return {"num_virtual_tokens": spec.num_virtual_tokens, "token_dim": dim,
                "num_transformer_submodules": spec.num_transformer_submodules,
                "num_attention_heads": getattr(cfg, "num_attention_heads", None),
                "num_layers": getattr(cfg, "num_hidden_layers", None),
                "prompt_tuning_init": INITS[spec.init], "prompt_tuning_init_text": spec.init_text}

    def spec_from_peft(self, config, model, tensor_names, where):
        subs = config.get("num_transformer_submodules") or 1
        if subs not in (1, 2) or (subs == 2 and not is_encoder_decoder(model)):
            raise LmforgeError(f"{where}: num_transformer_submodules={subs} does not fit this model "
                               "(1; 2 for encoder-decoder models only)")
        init = {v: k for k, v in INITS.items()}.get(config.get("prompt_tuning_init") or "RANDOM", "random")
        try:
            return PromptSpec(num_virtual_tokens=int(config["num_virtual_tokens"]),
                              init="random" if init == "text" and not config.get("prompt_tuning_init_text") else init,
                              init_text=config.get("prompt_tuning_init_text"), num_transformer_submodules=subs,
                              modules_to_save=list(config.get("modules_to_save") or []))
        except (KeyError, TypeError, ValueError) as err:
            raise LmforgeError(f"{where}: bad or missing value ({err})") from None


register_adapter(PromptKind())
