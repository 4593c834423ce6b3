"""Each kind's equation on hand-sized layers: DoRA's row norm without forming W0 + sBA, its fast path
and its dropout path; IA3's two placements and their merge; the bottleneck's residual MLP."""
import torch
from torch import nn

from lmforge.adapters import BottleneckAdapter, DoraLinear, Ia3Linear


def _linear(out_f=3, in_f=2, bias=True):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 4.0]])[:out_f, :in_f])
        if bias:
            lin.bias.copy_(torch.tensor([0.5, -0.5, 1.0])[:out_f])
    return lin


@torch.no_grad()
def test_dora_norm_and_output_by_hand():
    layer = DoraLinear(_linear(), r=1, alpha=2.0)  # scale s = 2
    layer.lora_A.weight.copy_(torch.tensor([[1.0, 0.0]]))
    layer.lora_B.weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
    # W0 + s B A = [[3, 2], [0, -1], [1, 4]] -> row norms sqrt(13), 1, sqrt(17)
    torch.testing.assert_close(layer.weight_norm(), torch.tensor([13.0, 1.0, 17.0]).sqrt())
    assert torch.allclose(layer.lora_magnitude_vector, torch.tensor([5.0, 1.0, 25.0]).sqrt())  # ||W0|| rows
    layer.lora_magnitude_vector.copy_(torch.tensor([2.0, 3.0, 4.0]))
    x = torch.tensor([[1.0, 1.0]])
    w = torch.tensor([[3.0, 2.0], [0.0, -1.0], [1.0, 4.0]])
    g = torch.tensor([2.0, 3.0, 4.0]) / torch.tensor([13.0, 1.0, 17.0]).sqrt()
    expect = (g[:, None] * w) @ x[0] + torch.tensor([0.5, -0.5, 1.0])  # m * V / ||V|| x + b
    torch.testing.assert_close(layer(x)[0], expect)


@torch.no_grad()
def test_dora_dropout_path_equals_fast_path_without_dropout():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    fast = DoraLinear(base, r=2, alpha=4.0)
    slow = DoraLinear(base, r=2, alpha=4.0, dropout=0.3)
    for p, q in zip(fast.parameters(), slow.parameters()):
        q.copy_(p + 0.0)
    fast.lora_B.weight.normal_()
    slow.lora_B.weight.copy_(fast.lora_B.weight)
    x = torch.randn(5, 8)
    slow.train()
    slow.lora_dropout.p = 0.0  # the second-pass path with an identity dropout
    torch.testing.assert_close(slow(x), fast(x), atol=1e-5, rtol=1e-5)
    slow.eval()
    slow.lora_dropout.p = 0.3  # eval: dropout off, fast path
    torch.testing.assert_close(slow(x), fast(x), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_ia3_attention_and_feedforward_by_hand():
    x = torch.tensor([[1.0, 1.0]])
    att = Ia3Linear(_linear(), feedforward=False)  # y = l * (W x + b)
    att.ia3_l.copy_(torch.tensor([[2.0], [0.0], [-1.0]]))
    torch.testing.assert_close(att(x), torch.tensor([[7.0, 0.0, -8.0]]))
    ff = Ia3Linear(_linear(), feedforward=True)  # y = W (l * x) + b
    ff.ia3_l.copy_(torch.tensor([[2.0, -1.0]]))
    torch.testing.assert_close(ff(x), torch.tensor([[0.5, 0.5, 3.0]]))
    for layer in (att, ff):
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before)


@torch.no_grad()
def test_bottleneck_by_hand():
    layer = BottleneckAdapter(_linear(), reduction_factor=3, activation="relu")  # width 1
    x = torch.tensor([[1.0, 1.0]])
    h = torch.tensor([[3.5, -1.5, 8.0]])
    torch.testing.assert_close(layer(x), h)  # W_up = 0: the identity
    layer.adapter_down.weight.copy_(torch.tensor([[1.0, 1.0, 0.0]]))
    layer.adapter_down.bias.fill_(-1.0)
    layer.adapter_up.weight.copy_(torch.tensor([[1.0], [2.0], [0.0]]))
    layer.adapter_up.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    # down(h) = 3.5 - 1.5 - 1 = 1, relu 1, up = [1, 2, 0] + [0, 0, 1]
    torch.testing.assert_close(layer(x), h + torch.tensor([[1.0, 2.0, 1.0]]))
