"""lmforge.fast_dropout against torch's dropout: same distribution, exact expectation, gradients."""
import torch
from torch import nn

from lmforge.fast_dropout import FastDropout, disable_fast_dropout, dropout, enable_fast_dropout, keep_bits


def test_drop_rate_is_p_in_every_lane_of_the_random_words():
    """Four 2-byte (two 4-byte) lanes per 64-bit draw: each lane (element i % 4, i % 2) drops at
    rate p (a lane fed by a biased bit, e.g. a non-negative generator's sign bit, would not)."""
    torch.manual_seed(0)
    for itemsize, lanes in ((2, 4), (4, 2)):
        m, p_q = keep_bits((400_000,), itemsize, 0.1)
        assert abs(p_q - 0.1) < 2 ** -15 and m.element_size() == itemsize
        assert set(m.unique().tolist()) == {0, -1}  # all ones (keep) or zero (drop)
        for lane in range(lanes):
            rate = (m[lane::lanes] == 0).float().mean().item()
            assert abs(rate - 0.1) < 0.004, (itemsize, lane, rate)  # >= 100k draws per lane: sd 0.00095
    m, _ = keep_bits((200_000,), 2, 0.5)
    assert abs((m == 0).float().mean().item() - 0.5) < 0.005


def test_kept_values_are_scaled_and_mean_is_preserved():
    torch.manual_seed(1)
    x = torch.full((100_000,), 2.0)
    y = dropout(x, 0.25)
    kept = y != 0
    p_q = round(0.25 * 2 ** 15) / 2 ** 15
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / (1 - p_q)))
    assert abs(y.mean().item() - 2.0) < 0.02
    assert y.dtype == x.dtype and dropout(x.bfloat16(), 0.25).dtype == torch.bfloat16


def test_gradient_is_the_same_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.3)
    g = torch.randn_like(y)
    y.backward(g)
    keep = y.detach() != 0
    scale = 1 / (1 - round(0.3 * 2 ** 15) / 2 ** 15)
    torch.testing.assert_close(x.grad, g * keep * scale)
    torch.testing.assert_close(y.detach(), x.detach() * keep * scale)


def test_bf16_and_non_contiguous_inputs():
    torch.manual_seed(4)
    x = torch.randn(40, 30, dtype=torch.bfloat16).t().requires_grad_()  # non-contiguous
    y = dropout(x, 0.2)
    keep = y.detach() != 0
    scale = 1 / (1 - round(0.2 * 2 ** 15) / 2 ** 15)
    torch.testing.assert_close(y.detach(), (x.detach().float() * keep * scale).bfloat16())
    g = torch.randn(30, 40, dtype=torch.bfloat16)
    y.backward(g)
    torch.testing.assert_close(x.grad, (g.float() * keep * scale).bfloat16())
    assert 0.1 < 1 - keep.float().mean().item() < 0.3


def test_seeded_masks_repeat_and_eval_or_p0_is_identity():
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = dropout(x, 0.1)
    torch.manual_seed(3)
    b = dropout(x, 0.1)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x


def test_module_swap_keeps_p_state_and_eval_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 2)))
    x = torch.randn(5, 8)
    ref = model.eval()(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert enable_fast_dropout(model) == 2 and enable_fast_dropout(model) == 0
    assert isinstance(model[1], FastDropout) and model[1].p == 0.2 and model[2][0].p == 0.1
    torch.testing.assert_close(model(x), ref)
    assert model.state_dict().keys() == state.keys()
    model.train()
    assert (model[1](torch.ones(10_000)) == 0).any()
    disable_fast_dropout(model)
    assert type(model[1]) is nn.Dropout


def test_wide_and_narrow_masking_agree_and_unscaled_dropout_returns_its_scale():
    """The 8-byte AND (even sizes) and the per-element AND (odd sizes, non-contiguous) give
    bits(x) & m; ``dropout_unscaled`` keeps x where kept (no scale) and returns 1 / (1 - p')."""
    from lmforge.fast_dropout import apply_mask, dropout_unscaled

    torch.manual_seed(5)
    for shape in ((6, 8), (3, 5), (7,)):  # 96 bytes (wide), 30 bytes (int16), 14 bytes (int16)
        x = torch.randn(shape, dtype=torch.bfloat16)
        m, _ = keep_bits(shape, 2, 0.4)
        ref = x.view(torch.int16).bitwise_and(m).view(torch.bfloat16)
        assert torch.equal(apply_mask(x, m), ref)
    xt = torch.randn(8, 6).t()  # non-contiguous fp32
    m, _ = keep_bits(xt.shape, 4, 0.4)
    assert torch.equal(apply_mask(xt, m), xt * (m != 0))
    x = torch.randn(50, 40, requires_grad=True)
    y, scale = dropout_unscaled(x, 0.25)
    assert scale == 1 / (1 - round(0.25 * 2 ** 15) / 2 ** 15)
    kept = y.detach() != 0
    torch.testing.assert_close(y.detach()[kept], x.detach()[kept])
    y.sum().backward()
    assert torch.equal(x.grad, kept.float())
    assert dropout_unscaled(x, 0.25, training=False) == (x, 1.0)
