"""The optimizer lmforge builds: fused AdamW where torch has it, equal to plain foreach AdamW."""
import torch
from torch import nn

from lmforge.train.optim import build_optimizer, param_groups


def test_build_optimizer_matches_foreach_adamw_with_decay_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    twin = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())
    ours = build_optimizer(model, lr=2e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(param_groups(twin, 0.1), lr=2e-2, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    assert ours.defaults.get("fused") or ours.defaults.get("foreach")
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(30):
        for net, opt in ((model, ours), (twin, ref)):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # decay only on matrices: the LayerNorm and biases sit in a no-decay group
    decays = sorted(g["weight_decay"] for g in ours.param_groups)
    assert decays[0] == 0.0 and decays[-1] == 0.1


def test_a_step_bumps_the_version_counters_caches_key_on():
    """Fused AdamW updates in place without bumping ``_version``; the optimizer lmforge builds does
    (the packed-weight caches of fast inference paths key on it)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model[1].weight.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    before = [p._version for p in model.parameters()]
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    after = [p._version for p in model.parameters()]
    moved = [a > b for a, b in zip(after, before)]
    assert moved == [True, True, False, True]          # the frozen weight neither steps nor bumps
