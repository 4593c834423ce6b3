"""Tiny random models built from configs (nothing is downloaded) and helpers for adapter tests."""
from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification,
                          BertModel, LlamaConfig, LlamaForCausalLM)

from lmforge.adapters import adapter_state_dict


def bert_config() -> BertConfig:
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, vocab_size=100, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=2)


def llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(**(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                               max_position_embeddings=64) | kw))


BUILDERS = {
    "bert_cls": lambda: BertForSequenceClassification(bert_config()),
    "bert_tok": lambda: BertForTokenClassification(bert_config()),
    "bert": lambda: BertModel(bert_config()),
    "llama": lambda: LlamaForCausalLM(llama_config()),
}


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return BUILDERS[kind]().eval()


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """A padded batch of 3 sequences of length 7 (ids < 100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 7), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@torch.no_grad()
def randomize_adapter(model: torch.nn.Module, seed: int = 2) -> None:
    """Give every adapter tensor (LoRA A and B, DoRA magnitudes, IA3 scales, prompts, bottleneck
    weights) and every modules_to_save copy non-trivial random values (LoRA A and B replaced by
    N(0, 0.2^2), everything else shifted by such noise)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in sorted(adapter_state_dict(model).items()):
        noise = torch.randn(t.shape, generator=g) * 0.2
        if name.endswith(("lora_A.weight", "lora_B.weight")):
            t.copy_(noise)
        else:
            t.add_(noise)
