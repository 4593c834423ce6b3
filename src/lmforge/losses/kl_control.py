"""KL coefficient controllers for RL from a reward: the state beside the pure losses of
:mod:`lmforge.losses.rl` (the coefficient ``beta`` of its KL penalty), saved and restored with a
run's loop state."""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError

__all__ = ["AdaptiveKLController", "FixedKLController"]


@dataclass
class FixedKLController:
    """A constant KL coefficient ``beta``; :meth:`update` is a no-op."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", Sec. 2.2):

        e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    ``n_steps`` is the number of samples (or steps) the measured ``KL_t`` covers. ``beta`` grows
    when the observed KL is above the target and shrinks when below, at most 20% per horizon.
    """

    value: float
    target: float
    horizon: int

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise LmforgeError(f"adaptive KL: target and horizon must be > 0, got {self.target}, {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self.value), "target": float(self.target), "horizon": int(self.horizon)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])
