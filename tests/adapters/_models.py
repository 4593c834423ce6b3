"""Tiny random models built from configs (nothing is downloaded) and helpers for adapter tests."""
from __future__ import annotations

import torch
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertForSequenceClassification,
                          BertForTokenClassification, BertModel, LlamaConfig, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from lmforge.adapters import adapter_state_dict


def bert_config() -> BertConfig:
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, vocab_size=100, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=2)


def llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(**(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                               max_position_embeddings=64) | kw))


def t5_config() -> T5Config:
    return T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


def bart_config(**kw) -> BartConfig:
    return BartConfig(**kw, vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, bos_token_id=0, pad_token_id=1,
                      eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None)


BUILDERS = {
    "bert_cls": lambda: BertForSequenceClassification(bert_config()),
    "bert_tok": lambda: BertForTokenClassification(bert_config()),
    "bert": lambda: BertModel(bert_config()),
    "llama": lambda: LlamaForCausalLM(llama_config()),
    "t5": lambda: T5ForConditionalGeneration(t5_config()),
    "bart": lambda: _biased(BartForConditionalGeneration(bart_config())),
    # larger random weights: greedy generations depend on the input (generation tests)
    "bart_sharp": lambda: _biased(BartForConditionalGeneration(bart_config(init_std=0.3))),
}


@torch.no_grad()
def _biased(model: BartForConditionalGeneration) -> BartForConditionalGeneration:
    """BART with a non-zero ``final_logits_bias`` (so the head's bias is exercised) that keeps EOS
    unlikely (so greedy decoding runs for more than one step)."""
    model.final_logits_bias.normal_(0, 0.05)
    model.final_logits_bias[0, model.config.eos_token_id] = -5.0
    return model


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


def with_decoder(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder-decoder models also get decoder ids (the first 4 source ids, reversed)."""
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" not in batch:
        return batch | {"decoder_input_ids": batch["input_ids"][:, :4].flip(1)}
    return batch


@torch.no_grad()
def output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**with_decoder(model, batch))
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
