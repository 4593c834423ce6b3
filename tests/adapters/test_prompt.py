"""Prompt tuning where peft's prompt methods broke for users: generation with and without the KV
cache, left padding, packing, chunked cross-entropy on hidden states, last-token pooling, and
initialisation from the vocabulary or a text."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForSequenceClassification

from lmforge.adapters import PromptSpec, apply_adapter, disable_adapters
from lmforge.adapters.prompt import initial_prompt
from lmforge.generation import GenerationConfig, decode
from lmforge.losses.lm import chunked_cross_entropy

from ._models import build, llama_config, randomize_adapter

N = 4


def prompted(seed: int = 0):
    model = build("llama", seed)
    torch.manual_seed(1)
    apply_adapter(model, PromptSpec(num_virtual_tokens=N))
    randomize_adapter(model)
    return model.eval()


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


ROWS = [[5, 17, 42, 8, 9, 11], [7, 3, 12]]


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_batched_left_padded_equals_each_row_alone(use_cache):
    model = prompted()
    cfg = GenerationConfig(max_new_tokens=6, use_cache=use_cache)
    ids, mask = left_pad(ROWS)
    batched = decode(model, ids, mask, cfg)
    alone = [decode(model, *left_pad([r]), cfg)[0] for r in ROWS]
    assert batched == alone


def test_kv_cache_equals_recomputation_and_prompt_matters():
    model = prompted()
    ids, mask = left_pad(ROWS)
    cached = decode(model, ids, mask, GenerationConfig(max_new_tokens=8, use_cache=True))
    full = decode(model, ids, mask, GenerationConfig(max_new_tokens=8, use_cache=False))
    assert cached == full
    with disable_adapters(model):
        base = decode(model, ids, mask, GenerationConfig(max_new_tokens=8, use_cache=True))
    assert base != cached


@torch.no_grad()
def test_packed_row_equals_samples_alone():
    model = prompted()
    a, b = [5, 17, 42, 8], [7, 3, 12]
    ids = torch.tensor([a + b])  # (1, 7): two samples packed
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    dec = model.get_decoder()
    packed = dec(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state  # (1, 7, H)
    apart = torch.cat([dec(input_ids=torch.tensor([s]), use_cache=False).last_hidden_state for s in (a, b)], 1)
    assert packed.shape == (1, 7, 32)
    torch.testing.assert_close(packed, apart, atol=1e-5, rtol=1e-5)


def test_hidden_states_line_up_with_input_ids_for_chunked_ce():
    model = prompted()
    ids = torch.tensor([ROWS[0]])
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # (1, T, H): virtual positions stripped
    assert hidden.shape[1] == ids.shape[1]
    logits = model(input_ids=ids).logits  # (1, T, V)
    labels = ids.clone()
    labels[:, :2] = -100
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    w = model.get_output_embeddings().weight
    loss = chunked_cross_entropy(hidden[:, :-1], w, labels[:, 1:], chunk_size=2, reduction="mean")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.lmforge_prompt.embedding.weight.grad is not None


@torch.no_grad()
def test_reward_model_pools_the_last_real_token():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(num_labels=1, pad_token_id=0)).eval()
    apply_adapter(model, PromptSpec(num_virtual_tokens=N))
    randomize_adapter(model)
    ids = torch.tensor([[5, 17, 42, 8], [7, 3, 0, 0]])  # right padded with pad id 0
    mask = (ids != 0).long()
    scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]  # (B,)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    expect = model.score(hidden[torch.arange(2), torch.tensor([3, 1])])[:, 0]
    torch.testing.assert_close(scores, expect)


def test_initialisation_from_vocab_and_text():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = torch.randn(100, 8)
    torch.manual_seed(0)
    vocab = initial_prompt(table, PromptSpec(num_virtual_tokens=3, init="vocab"))
    assert all(any(torch.equal(row, t) for t in table) for row in vocab)  # rows of the table
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "classify": 7, "sentiment": 9}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = initial_prompt(table, PromptSpec(num_virtual_tokens=5, init="text", init_text="classify sentiment"),
                          fast)
    assert torch.equal(text, table[[7, 9, 7, 9, 7]])  # the text's tokens, repeated to N
    rand = initial_prompt(table, PromptSpec(num_virtual_tokens=2000, init="random"))
    assert abs(float(rand.std()) - float(table.std())) < 0.1
