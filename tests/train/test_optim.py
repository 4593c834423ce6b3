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
