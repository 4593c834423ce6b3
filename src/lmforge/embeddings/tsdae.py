"""TSDAE: transformer-based sequential denoising auto-encoder (Wang, Reimers & Gurevych 2021).

The encoder embeds a damaged sentence (each word deleted with probability 0.6); a decoder
whose weights are tied to the encoder's (only its cross-attention blocks and LM-head transform
are new) must reconstruct the original sentence while cross-attending to nothing but the
pooled sentence vector. The bottleneck forces the vector to carry the sentence's content.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LmforgeError


def delete_words(text: str, ratio: float, rng: random.Random) -> str:
    """Deletion noise: drop each whitespace-separated word with probability ``ratio``; keep >= 1 word."""
    words = text.split()
    if not words:
        return text
    kept = [w for w in words if rng.random() >= ratio]
    return " ".join(kept) if kept else words[rng.randrange(len(words))]


def tie_to_encoder(decoder_base: nn.Module, encoder: nn.Module) -> int:
    """Make ``decoder_base`` share every parameter of ``encoder`` found under the same module name.

    Modules with no counterpart (cross-attention) keep their own parameters.
    Returns the number of parameters tied.
    """
    enc = dict(encoder.named_modules())
    tied = 0
    for name, mod in decoder_base.named_modules():
        src = enc.get(name)
        if src is None or type(src) is not type(mod):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            sp = src._parameters.get(pname)
            if sp is not None and sp.shape == p.shape:
                setattr(mod, pname, sp)
                tied += 1
    return tied


def build_tied_decoder(backbone: nn.Module) -> nn.Module:
    """A causal-LM decoder with cross-attention, its transformer weights tied to ``backbone``.

    Args:
        backbone: the encoder's base model (BERT-like; its config must support ``is_decoder`` and
            ``add_cross_attention``).

    Returns:
        The decoder (e.g. ``BertLMHeadModel``); its LM head is tied to the shared word embeddings.
    """
    from transformers import AutoModelForCausalLM

    cfg = backbone.config.__class__.from_dict(backbone.config.to_dict())
    if getattr(cfg, "is_decoder", None) is None or "add_cross_attention" not in cfg.to_dict():
        raise LmforgeError("tsdae needs an encoder model (BERT-like) whose decoder can cross-attend")
    cfg.is_decoder, cfg.add_cross_attention, cfg.tie_word_embeddings = True, True, True
    try:
        decoder = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    except (ValueError, KeyError) as exc:
        raise LmforgeError(f"tsdae: no decoder variant for {type(backbone).__name__} ({exc})") from None
    base = decoder.base_model
    if not any("crossattention" in n or "cross_attn" in n for n, _ in base.named_modules()):
        raise LmforgeError(f"tsdae: {type(backbone).__name__} cannot cross-attend to a sentence vector; "
                           "use an encoder model such as BERT/MiniLM")
    if tie_to_encoder(base, backbone) == 0:
        raise LmforgeError("tsdae: the decoder shares no weights with the encoder")
    decoder.get_output_embeddings().weight = base.get_input_embeddings().weight
    return decoder


def tsdae_loss(decoder: nn.Module, sentence_emb: Tensor, target_ids: Tensor, target_mask: Tensor) -> Tensor:
    """Reconstruction loss of the original sentences from their (damaged-input) vectors.

    ``L = -(1/N) sum_{i,t} log p(x_{i,t+1} | x_{i,<=t}, e_i)`` over the N real target tokens,
    the decoder attending causally to the sentence and cross-attending to ``e_i`` as a memory of
    length 1.

    Args:
        decoder: from :func:`build_tied_decoder`.
        sentence_emb: ``(B, D)`` pooled vectors of the damaged sentences.
        target_ids: ``(B, T)`` token ids of the original sentences (right padded).
        target_mask: ``(B, T)`` their attention mask.

    Returns:
        0-dim mean token cross-entropy.
    """
    inputs, mask = target_ids[:, :-1], target_mask[:, :-1]  # (B, T-1)
    labels = target_ids[:, 1:].masked_fill(target_mask[:, 1:] == 0, -100)  # (B, T-1)
    memory = sentence_emb[:, None, :]  # (B, 1, D)
    logits = decoder(input_ids=inputs, attention_mask=mask, encoder_hidden_states=memory,
                     use_cache=False).logits  # (B, T-1, V)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.reshape(-1), ignore_index=-100)
