"""What a server serves: model ids -> a causal LM (base and each adapter) or a sentence encoder.

Adapters on the same base share its weights: the base module tree is copied with every parameter
and buffer shared (``copy.deepcopy`` with those tensors pre-seeded in the memo), then the adapter's
LoRA layers wrap that copy's linear modules. N adapters cost N small LoRA matrices, not N bases.
An adapter trained on a 4-bit base (or on another base) is loaded on its own.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LmforgeError
from .batcher import Served

log = logging.getLogger("lmforge")


@dataclass
class ServeOptions:
    """``lmforge serve`` settings."""

    model: str
    adapters: list[str] = field(default_factory=list)
    embeddings: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    precision: str = "auto"
    max_batch: int = 8
    max_tokens: int = 512
    name: str | None = None


@dataclass
class Registry:
    """The loaded models by id."""

    generators: dict[str, Served] = field(default_factory=dict)
    encoders: dict[str, object] = field(default_factory=dict)
    placement: object = None

    def ids(self) -> list[str]:
        return list(self.generators) + list(self.encoders)


def model_id(ref: str) -> str:
    """A readable id: the alias, or the folder name (a run's name for ``run/adapter``)."""
    p = Path(ref)
    if p.name in ("adapter", "model") and p.parent.name:
        return p.parent.name
    return p.name or ref


def _is_encoder_ref(ref: str) -> tuple[bool, str]:
    """(is an encoder, the folder/ref to load it from): embed runs and non-causal models."""
    from ..models import is_decoder_only, resolve_model
    from ..rundir import is_run_dir

    p = Path(ref)
    if is_run_dir(p):
        from ..rundir import read_config

        cfg = read_config(p)
        if str(cfg.task) == "embed":
            if not (p / "model").is_dir():
                raise LmforgeError(f"{p}: the embed run has no model/ folder (did training finish?)")
            return True, str(p / "model")
        return False, ref
    if (p / "adapter_config.json").is_file():
        return False, ref
    from transformers import AutoConfig

    folder = resolve_model(ref)
    from ..embeddings.st_io import read_st_settings

    hf_dir = folder / read_st_settings(folder).transformer_path
    try:
        cfg = AutoConfig.from_pretrained(str(hf_dir))
    except (OSError, ValueError) as exc:
        raise LmforgeError(f"{ref}: cannot read the model config ({str(exc).splitlines()[0]})") from None
    return (not is_decoder_only(cfg)) or (folder / "modules.json").is_file(), str(folder)


def _served(model, tokenizer) -> Served:
    from ..generation import eos_token_ids

    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    return Served(model, tokenizer, eos, pad, max_pos)


def _shared_copy(model):
    """A copy of ``model`` whose parameters and buffers are the same tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def load_registry(opts: ServeOptions) -> Registry:
    """Load the base (or encoder), each adapter and the optional embedding model."""
    from ..device import Placement
    from ..merge import load_causal_lm, resolve_source

    placement = Placement.resolve(opts.device, opts.precision)
    reg = Registry(placement=placement)

    def add(table: dict, name: str, value) -> None:
        key, i = name, 2
        while key in reg.generators or key in reg.encoders:
            key, i = f"{name}-{i}", i + 1
        table[key] = value

    encoder, ref = _is_encoder_ref(opts.model)
    if encoder:
        if opts.adapters:
            raise LmforgeError(f"{opts.model}: an encoder serves embeddings only; --adapter needs a causal LM")
        add(reg.encoders, opts.name or model_id(opts.model), _encoder(ref, placement))
    else:
        src = resolve_source(opts.model)
        base, tok, _ = load_causal_lm(src, device=placement.device)
        if placement.bf16_weights:  # a CPU without native bf16: linear weights stored bf16, applied in fp32;
            placement.for_inference(base)  # the adapters' copies below share them (their own weights stay fp32)
        add(reg.generators, opts.name or model_id(opts.model), _served(base, tok))
        for ad in opts.adapters:
            if src.adapter is not None:
                raise LmforgeError(f"{opts.model} already carries an adapter; serve a base model with --adapter")
            asrc = resolve_source(opts.model, ad)
            if asrc.base_4bit or src.base_4bit:
                model, atok, _ = load_causal_lm(asrc, device=placement.device)
            else:
                from ..adapters import load_adapter

                model = _shared_copy(base)
                load_adapter(model, asrc.adapter)
                model.eval()
                atok = tok
            add(reg.generators, model_id(ad), _served(model, atok))
    if opts.embeddings:
        is_enc, eref = _is_encoder_ref(opts.embeddings)
        add(reg.encoders, model_id(opts.embeddings), _encoder(eref, placement))
    log.info("serving %s on %s", ", ".join(reg.ids()), placement.describe())
    return reg


def _encoder(ref: str, placement):
    from ..embeddings.encoder import SentenceEncoder

    return SentenceEncoder.from_pretrained(ref).to_inference(placement)
