"""NF4 quantisation: levels, error bound, memory, Linear4bit, whole-model swaps."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.errors import LmforgeError
from lmforge.quant import (
    NF4_CODE,
    Linear4bit,
    dequantize_model,
    dequantize_nf4,
    nf4_weight_bytes,
    quantize_model,
    quantize_nf4,
)


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    return torch.stack([codes >> 4, codes & 15], dim=-1).view(-1).long()


# --- levels and hand-computed values -------------------------------------------------


def test_nf4_code_is_the_qlora_normal_quantile_construction():
    """QLoRA's NF4: 8 positive quantiles of N(0,1) from p = delta..1/2, 7 negative from
    p = delta..1/2, plus an exact 0, normalised to [-1, 1]; delta = 1 - (1/32 + 1/30)/2."""
    delta = 1 - (1 / 32 + 1 / 30) / 2
    pos = norm.ppf(np.linspace(delta, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(delta, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    levels /= np.abs(levels).max()
    assert NF4_CODE.shape == (16,) and NF4_CODE.dtype == torch.float32
    np.testing.assert_allclose(NF4_CODE.numpy(), levels, atol=1e-6)


def test_hand_computed_codes_packing_and_double_quant():
    # Block 0 absmax 1: 1.0 -> 15, -0.5 -> 2 (-0.5251), 0.3 -> 11 (0.3379 beats 0.2461), 0 -> 7.
    # Block 1 absmax 0.5: 0.5 -> 15, -0.25 -> 2, 0.15 -> 11, 0 -> 7.
    w = torch.tensor([[1.0, -0.5, 0.3, 0.0], [0.5, -0.25, 0.15, 0.0]])
    q = quantize_nf4(w, block_size=4, scale_block_size=2)
    assert q.codes.dtype == torch.uint8
    assert q.codes.tolist() == [0xF2, 0xB7, 0xF2, 0xB7]
    # mean absmax m = 0.75; centred +-0.25; S = 0.25; k = +-127.
    assert q.scale_offset.item() == pytest.approx(0.75)
    assert q.scale_scales.tolist() == pytest.approx([0.25])
    assert q.scale_codes.tolist() == [127, -127]
    row = torch.tensor([1.0, -0.5250730514526367, 0.33791524171829224, 0.0])
    torch.testing.assert_close(dequantize_nf4(q), torch.stack([row, row / 2]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape,block_size", [((64, 96), 64), ((33, 50), 64), ((5, 7), 64), ((48, 40), 32)])
def test_elementwise_error_bound(shape, block_size):
    """Per element j of block b in scale block s:

    |w_j - q[c_j] a'_b| <= |w_j - q[c_j] a_b| + |q[c_j]| |a_b - a'_b|
                        <= a_b * g / 2      + S_s / 254,

    where a_b is the true block absmax, so w_j / a_b is in [-1, 1] = [q_0, q_15] and the
    nearest level is at most half the largest gap g between adjacent levels away; |q| <= 1;
    a'_b = k_b S_s / 127 + m with k_b = round(127 (a_b - m) / S_s), so the rounding error
    of the int8 scale is at most half a step, S_s / 254, with S_s = max_{b in s} |a_b - m|.
    A 1e-6 relative slack covers fp32 arithmetic.
    """
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.05
    w.view(-1)[3] = 1.5  # an outlier block
    if w.numel() >= 3 * block_size:
        w.view(-1)[block_size : 2 * block_size] = 0.0  # an all-zero block
    scale_block_size = 4
    q = quantize_nf4(w, block_size=block_size, scale_block_size=scale_block_size)
    deq = dequantize_nf4(q, torch.float32)
    assert deq.shape == w.shape and deq.dtype == torch.float32

    n = w.numel()
    n_blocks = -(-n // block_size)
    blocks = F.pad(w.reshape(-1), (0, n_blocks * block_size - n)).view(n_blocks, block_size)
    a = blocks.abs().amax(1)  # (nb,)
    centred = F.pad(a - a.mean(), (0, -n_blocks % scale_block_size)).view(-1, scale_block_size)
    s = centred.abs().amax(1).repeat_interleave(scale_block_size)[:n_blocks]  # (nb,)
    g = (NF4_CODE[1:] - NF4_CODE[:-1]).max()
    bound = (a * g / 2 + s / 254).repeat_interleave(block_size)[:n].view(shape)
    err = (w - deq).abs()
    assert (err <= bound + 1e-6 * w.abs().max()).all(), (err - bound).max()
    if w.numel() >= 3 * block_size:
        assert (deq.view(-1)[block_size : 2 * block_size] == 0).all()


def test_relative_frobenius_error_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(512, 768) * 0.02
    deq = dequantize_nf4(quantize_nf4(w))
    rel = (torch.linalg.matrix_norm(w - deq) / torch.linalg.matrix_norm(w)).item()
    assert 0.05 < rel < 0.1  # NF4 on N(0, s^2): ~0.092


def test_weight_memory_256x256():
    lin = nn.Linear(256, 256, bias=False, dtype=torch.bfloat16)
    q = Linear4bit.from_linear(lin)
    # codes 65536/2 + int8 scales 1024 + fp32 scale-of-scales 4*4 + fp32 mean 4.
    assert nf4_weight_bytes(nn.Sequential(q)) == 32768 + 1024 + 16 + 4
    assert nf4_weight_bytes(nn.Sequential(q)) <= 0.3 * 256 * 256 * 2


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(LmforgeError, match="block_size"):
        quantize_nf4(torch.randn(4, 4), block_size=7)
    with pytest.raises(LmforgeError, match="2-D"):
        quantize_nf4(torch.randn(16))
    with pytest.raises(LmforgeError, match="NaN"):
        quantize_nf4(torch.tensor([[1.0, float("nan")]]))


# --- Linear4bit ----------------------------------------------------------------------


def _layer(dtype=torch.float32, bias=True) -> tuple[nn.Linear, Linear4bit]:
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias, dtype=dtype)
    return lin, Linear4bit.from_linear(lin)


def test_linear4bit_holds_no_weight_parameter():
    lin, q = _layer()
    assert [n for n, _ in q.named_parameters()] == ["bias"]
    assert {"codes", "scale_codes", "scale_scales", "scale_offset"} <= set(dict(q.named_buffers()))
    assert (q.in_features, q.out_features, q.compute_dtype) == (96, 40, torch.float32)
    torch.testing.assert_close(q.bias, lin.bias)
    torch.testing.assert_close(q.dequantize(), dequantize_nf4(quantize_nf4(lin.weight)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_forward_equals_linear_with_dequantised_weight(dtype):
    lin, q = _layer(dtype)
    x = torch.randn(3, 5, 96, dtype=dtype)
    y = q(x)
    assert y.shape == (3, 5, 40) and y.dtype == dtype
    torch.testing.assert_close(y, F.linear(x, q.dequantize(dtype), lin.bias), rtol=0, atol=0)
    # ... and close to the unquantised layer.
    ref = lin(x).float()
    assert F.cosine_similarity(y.float().flatten(), ref.flatten(), dim=0) > 0.99


def test_bf16_input_on_fp32_layer_and_autocast():
    lin, q = _layer(torch.float32)
    x = torch.randn(4, 96)
    ref = F.linear(x, q.dequantize(torch.float32), q.bias)
    y16 = q(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = q(x)
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya, y16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_flow_to_inputs_not_to_the_weight(dtype):
    lin, q = _layer(dtype)
    x = torch.randn(6, 96, dtype=dtype, requires_grad=True)
    g = torch.randn(6, 40, dtype=dtype)
    q(x).backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, q.dequantize(dtype), q.bias.detach()).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(q.bias.grad, g.sum(0))
    assert all(not b.requires_grad and b.grad is None for b in q.buffers())


def test_autograd_keeps_no_dequantised_weight_alive():
    _, q = _layer()
    x = torch.randn(6, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        q(x).sum().backward()
    assert (40, 96) not in saved and (96, 40) not in saved
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(6, 96))


def test_autocast_backward_gives_fp32_input_grads():
    _, q = _layer()
    x = torch.randn(6, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(6, 96), rtol=2e-2, atol=2e-2)


def test_to_dtype_keeps_scales_exact_and_tracks_compute_dtype():
    _, q = _layer(torch.float32)
    before = q.dequantize(torch.float32)
    q.to(torch.bfloat16)
    assert q.compute_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert q.dequantize().dtype == torch.bfloat16
    torch.testing.assert_close(q.dequantize(torch.float32), before, rtol=0, atol=0)


# --- whole models --------------------------------------------------------------------


def test_quantize_model_on_tiny_llama_keeps_logits_and_frees_memory():
    model = _tiny_llama()
    ref = copy.deepcopy(model)
    ids = _ids()

    def float_bytes(m):
        return sum(t.nbytes for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point())

    before = float_bytes(model)
    replaced = quantize_model(model)
    assert len(replaced) == 2 * 7 and "lm_head" not in replaced
    assert "model.layers.0.self_attn.q_proj" in replaced and "model.layers.1.mlp.down_proj" in replaced
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Linear4bit)
    linear_weight_bytes = sum(ref.get_submodule(n).weight.nbytes for n in replaced)
    assert before - float_bytes(model) == linear_weight_bytes  # every replaced fp32 weight is gone
    assert nf4_weight_bytes(model) <= 0.15 * linear_weight_bytes  # ~4.13 of 32 bits
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert quantize_model(model) == []  # idempotent


def test_quantize_model_skip_names():
    model = _tiny_llama()
    replaced = quantize_model(model, skip=("lm_head", "down_proj"))
    assert len(replaced) == 2 * 6 and not any(n.endswith("down_proj") for n in replaced)


class _Wrap(nn.Module):
    """A LoRA-shaped wrapper: ``base(x) + B(A(x))``."""

    def __init__(self, base: nn.Module, r: int = 2):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


def test_dequantize_model_round_trip_including_wrapped_bases():
    model = _tiny_llama()
    quantize_model(model)
    attn = model.model.layers[0].self_attn
    attn.q_proj = _Wrap(attn.q_proj)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    assert dequantize_model(model, dtype=torch.float32) == 14
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert type(attn.q_proj.base) is nn.Linear and not attn.q_proj.base.weight.requires_grad
    assert type(attn.q_proj.lora_A) is nn.Linear
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_llama(seed=0)
    quantize_model(model)
    save_file(model.state_dict(), tmp_path / "q.safetensors")

    other = _tiny_llama(seed=1)
    quantize_model(other)
    ids = _ids()
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, model(ids).logits)
    other.load_state_dict(load_file(tmp_path / "q.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)


# --- parity with torchao (runs only where torchao is installed) ------------------------


def test_codes_match_torchao_nf4tensor():
    nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    torch.manual_seed(0)
    w = torch.randn(576, 256) * 0.02
    ours = quantize_nf4(w, 64, 256)
    theirs = nf4_tensor.to_nf4(w, 64, 256)
    c_ours, c_theirs = _unpack(ours.codes), _unpack(theirs.quantized_data)
    # Codes agree except for values within float noise of a midpoint between two levels.
    x = (w.view(-1, 64) / w.view(-1, 64).abs().amax(1, keepdim=True)).view(-1)
    mid = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    differ = c_ours != c_theirs
    assert differ.float().mean() < 1e-3
    assert ((x[differ, None] - mid).abs().min(1).values < 1e-4).all()
    # Where codes agree, only the int8 block scales differ: ours round (error <= S/254),
    # torchao's int8 scales were measured to err up to S/127; S = max |a_b - mean(a)|.
    a = w.view(-1, 64).abs().amax(1)
    s_max = (a - a.mean()).abs().max().item()
    same = ~differ.view(w.shape)
    diff = (dequantize_nf4(ours) - theirs.get_original_weight())[same].abs()
    assert diff.max() <= 3 * s_max / 254 + 1e-7
