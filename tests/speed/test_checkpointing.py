"""Activation checkpointing (Placement.checkpoint_activations) against plain backprop."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.adapters.lora import LoraSpec, apply_lora
from lmforge.device import Placement


def _lora_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _step(model, ids):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(saved)


def test_checkpointing_same_gradients_fewer_saved_activations():
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_a, grads_a, saved_a = _step(_lora_llama(), ids)
    model = _lora_llama()
    assert Placement(torch.device("cpu"), torch.float32).checkpoint_activations(model) == 1
    loss_b, grads_b, saved_b = _step(model, ids)
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys() and len(grads_a) == 18
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-6, rtol=1e-5)
    assert saved_b < 0.6 * saved_a  # the blocks' activations are recomputed, not kept
