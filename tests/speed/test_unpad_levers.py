"""lmforge.unpad's training levers against plain computations: the head-major varlen kernel (one
dropout mask, its scale on the output), the last layer on first rows only for first-token heads."""
import inspect

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from lmforge.fast_dropout import keep_bits
from lmforge.unpad import disable_unpadding, enable_unpadding, first_rows_layer, varlen_eager


def _bert(cls=BertForSequenceClassification, layers=2):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cls._from_config(cfg, attn_implementation="eager").train()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (4, 9), generator=g)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for b, n in enumerate([9, 5, 2, 7]):
        mask[b, :n] = 1
    return ids * mask, mask


def test_varlen_eager_dropout_is_one_mask_with_its_scale_on_the_output():
    """Hand-computed per sequence: out_b = (softmax(q_b k_b^T s) * keep_b) v_b / (1 - p'), keep_b
    the seeded mask's block (head-major (H*B, L, L) layout), the other sequences never attended."""
    torch.manual_seed(0)
    h, d, lens = 2, 4, [3, 1, 5]
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    q, k, v = (torch.randn(1, h, 9, d, requires_grad=True) for _ in range(3))
    mod = torch.nn.Module().train()
    torch.manual_seed(5)
    out = varlen_eager(mod, q, k, v, cu, 5, scaling=0.5, dropout=0.3)  # (1, N, H, d)
    torch.manual_seed(5)
    m, p_q = keep_bits((h * 3, 5, 5), 4, 0.3)
    assert (m == 0).any()
    for b, (start, n) in enumerate(zip(cu[:-1].tolist(), lens)):
        for head in range(h):
            sl = slice(start, start + n)
            w = torch.softmax(q[0, head, sl] @ k[0, head, sl].T * 0.5, -1)
            keep = (m[head * 3 + b, :n, :n] != 0).float()
            ref = (w * keep) @ v[0, head, sl] / (1 - p_q)
            torch.testing.assert_close(out[0, sl, head], ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


def test_varlen_eager_one_query_per_sequence_equals_its_first_row():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 3, 7, 4) for _ in range(3))
    cu = torch.tensor([0, 4, 5, 7], dtype=torch.int32)
    mod = torch.nn.Module().eval()
    full = varlen_eager(mod, q, k, v, cu, 4, scaling=0.4)
    rows = cu[:-1].long()
    first = varlen_eager(mod, q[:, :, rows], k, v, cu, 4, scaling=0.4, q_cu=torch.arange(4), q_len=1)
    torch.testing.assert_close(first, full[:, rows], atol=1e-6, rtol=1e-6)


def test_first_rows_layer_equals_the_full_layer_at_first_rows():
    """Outputs at each sequence's first row and the gradients of everything (input, weights)
    through those rows equal the full layer's; other rows are zeros."""
    model = _bert(BertModel)
    enable_unpadding(model)
    layer = model.encoder.layer[-1]
    cu = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    rows = cu[:-1].long()
    x0 = torch.randn(1, 9, 32)
    kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 4, "max_length_k": 4}
    results = []
    for fast in (False, True):
        x = x0.clone().requires_grad_()
        out = first_rows_layer(layer, x, None, cu=cu, max_len=4) if fast else layer(x, None, **kw)
        out[:, rows].square().sum().backward()
        results.append((out.detach(), x.grad, layer.attention.self.query.weight.grad.clone(),
                        layer.output.dense.weight.grad.clone()))
        model.zero_grad()
    (full, *gf), (fast, *gq) = results
    torch.testing.assert_close(fast[:, rows], full[:, rows], atol=1e-5, rtol=1e-5)
    assert not fast[:, [1, 2, 3, 6, 7, 8]].any()
    for a, b in zip(gq, gf):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_first_token_head_logits_and_gradients_equal_plain_with_the_last_layer_on_first_rows():
    """A BERT sequence classifier, prompt tuning (LoRA: test_unpad.py), training mode: unpadded with the last layer
    on first rows gives the plain padded model's logits and adapter gradients; the encoder's output
    inside the head's call holds first rows only (the lever ran); direct backbone calls are full."""
    from lmforge.adapters import apply_adapter
    from lmforge.adapters.prompt import PromptSpec

    ids, mask = _batch()
    outs, grads, seen = [], [], []
    for unpad in (False, True):
        model = _bert()
        torch.manual_seed(3)
        apply_adapter(model, PromptSpec(num_virtual_tokens=2, init="random", modules_to_save=["classifier"]))
        if unpad:
            assert enable_unpadding(model)
            assert "labels" in inspect.signature(model.forward).parameters
        hook = model.bert.encoder.register_forward_hook(lambda m, a, o: seen.append(o.last_hidden_state.detach()))
        logits = model(input_ids=ids, attention_mask=mask).logits
        hook.remove()
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 1])).backward()
        outs.append(logits.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if unpad:
            full = model.bert(ids, attention_mask=mask).last_hidden_state
            assert full[mask.bool()].abs().min() > 0  # no first-rows shortcut outside the head
            disable_unpadding(model)
            assert "forward" not in model.__dict__
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any("prompt" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)
    packed = seen[1][0]  # (N, D): rows 0, 11, 18, 22 are the sequences' first (prompt) tokens
    lens = (mask.sum(1) + 2).tolist()
    starts = [sum(lens[:b]) for b in range(4)]
    others = [i for i in range(sum(lens)) if i not in starts]
    assert packed[starts].abs().min() > 0 and not packed[others].any()


def test_first_token_head_unpads_even_without_padding():
    """With no padding the plain path would run; a first-token head still packs the batch so its
    last layer runs on first rows (the gathers cost less than the 5/6 of a layer it saves)."""
    model = _bert()
    ids = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 6, dtype=torch.long)
    ref = model(input_ids=ids, attention_mask=mask).logits
    enable_unpadding(model)
    seen = []
    hook = model.bert.encoder.register_forward_hook(lambda m, a, o: seen.append(o.last_hidden_state.detach()))
    out = model(input_ids=ids, attention_mask=mask).logits
    hook.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert seen[0].shape == (1, 18, 32) and not seen[0][0, [1, 2, 3, 4, 5, 7]].any()


def test_roberta_positions_and_mpnet_refusal():
    """RoBERTa's positions start at padding_idx + 1 (unpadded == plain, through the first-rows
    head too); MPNet's attention does not go through transformers' attention interface, so it
    is not unpadded (packing would let sequences attend to each other)."""
    from transformers import MPNetConfig, MPNetModel, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=40, pad_token_id=1)
    model = RobertaForSequenceClassification._from_config(cfg, attn_implementation="eager").train()
    ids, mask = _batch()
    ids = torch.where(mask.bool(), ids.clamp(min=3), 1)
    ref = model(input_ids=ids, attention_mask=mask).logits
    ref_h = model.roberta(ids, attention_mask=mask).last_hidden_state
    assert enable_unpadding(model) and "forward" in model.__dict__
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-5, rtol=1e-5)
    h = model.roberta(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(h[mask.bool()], ref_h[mask.bool()], atol=1e-5, rtol=1e-5)
    mpnet = MPNetModel._from_config(MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=4, intermediate_size=64))
    assert not enable_unpadding(mpnet)


def test_keep_bits_equals_the_hand_formula_on_the_same_words(monkeypatch):
    """keep = ~((u - k) >> (w - 1)) with u the low 15 bits of each lane of the seeded int64 words
    (the two-pass formula the one-pass (k - 1 - u) >> (w - 1) replaced), at the edges of k too.
    The torch path (without the C kernel of lmforge.cpu_kernels, tested in test_cpu_kernels)."""
    from lmforge import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_LIB", [None])
    for itemsize, it in ((2, torch.int16), (4, torch.int32)):
        for p in (0.1, 2 ** -15, 1 - 2 ** -15, 0.5):
            torch.manual_seed(3)
            m, p_q = keep_bits((1001,), itemsize, p)
            torch.manual_seed(3)
            words = torch.empty(-(-1001 * itemsize // 8), dtype=torch.int64).random_()
            u = words.view(it)[:1001].long() & (2 ** 15 - 1)
            k = round(p * 2 ** 15)
            ref = torch.where(u < k, 0, -1).to(it)
            assert torch.equal(m, ref), (itemsize, p)
            assert p_q == k / 2 ** 15
