"""Placement.for_inference (bf16 parameters for inference-only models) against autocast over fp32."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.device import Placement
from lmforge.generation import GenerationConfig, decode


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_for_inference_matches_autocast_over_fp32_weights():
    place = Placement(torch.device("cpu"), torch.bfloat16)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ref_model, fast = _llama(), _llama()
    assert place.for_inference(fast) == len(list(fast.parameters()))
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    assert all(b.dtype == torch.float32 for n, b in fast.named_buffers() if b.is_floating_point())  # rotary kept
    with torch.no_grad(), place.autocast():
        ref = ref_model(ids, attention_mask=mask).logits.float()
        out = fast(ids, attention_mask=mask).logits.float()
    # the matmuls see the same bf16 weights; norms and embeddings round once more: bf16-level difference
    assert (out - ref).abs().max() <= 0.03 * ref.abs().max()
    cfg = GenerationConfig(max_new_tokens=6)
    with torch.inference_mode(), place.autocast():
        a = decode(ref_model, ids, mask, cfg)
        b = decode(fast, ids, mask, cfg)
    assert a == b


def test_for_inference_is_a_no_op_in_fp32():
    model = _llama()
    assert Placement(torch.device("cpu"), torch.float32).for_inference(model) == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
