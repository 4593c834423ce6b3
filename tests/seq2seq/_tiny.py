"""Tiny random T5 and BART folders built from configs, with word-level tokenizers built in code."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import EXTRA, WORDS


def word_tokenizer(kind: str):
    """T5-style (``x </s>``; pad 0, eos 1) or BART-style (``<s> x </s>``; bos 0, pad 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(WORDS) + EXTRA + list("?!.,:"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if kind == "t5":
        tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    else:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                      bos_token="<s>")
    return tok, vocab


def t5_model(vocab_size: int = 100, seed: int = 0, **kw):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(**(dict(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                           num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                           eos_token_id=1, decoder_start_token_id=0) | kw))
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(cfg).eval()


def bart_model(vocab_size: int = 100, seed: int = 0, **kw):
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(**(dict(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                             decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None) | kw))
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a non-zero final_logits_bias, so the head's bias is exercised
        model.final_logits_bias.normal_(0, 0.5)
    return model


def flan_model(vocab_size: int = 100, seed: int = 0, **kw):
    """T5 v1.1 / FLAN-T5 layout: gated-GELU feed-forward (wi_0, wi_1, wo), untied LM head (no output scaling)."""
    return t5_model(vocab_size, seed, **({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False} | kw))


BUILD = {"t5": t5_model, "flan": flan_model, "bart": bart_model}


def make_folder(kind: str, path: Path, seed: int = 0) -> Path:
    """A saved tiny ``kind`` ("t5", "flan" or "bart") model + tokenizer folder."""
    tok, vocab = word_tokenizer("bart" if kind == "bart" else "t5")
    model = BUILD[kind](vocab_size=len(vocab), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
