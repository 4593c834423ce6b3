"""Reward functions the rl tests name by dotted path (``toy_rewards.fraction_good``)."""


def fraction_good(text: str) -> float:
    """Share of the response's words that are 'good' (0 for an empty response)."""
    words = text.split()
    return sum(w == "good" for w in words) / max(len(words), 1)


def explode(text: str) -> float:
    raise ValueError("the scorer is broken")


def not_a_number(text: str):
    return "high"


POSITIVE = {"good", "great", "fine", "lovely", "superb", "nice"}


def fraction_positive(text: str) -> float:
    """Share of the response's words that are positive adjectives (0 for an empty response)."""
    words = text.split()
    return sum(w in POSITIVE for w in words) / max(len(words), 1)


CALLS = {"n": 0}


def collapsing(text: str) -> float:
    """fraction_positive + 1 for the first 16 calls (two rollouts of 8), then 0: a reward collapse."""
    CALLS["n"] += 1
    return fraction_positive(text) + 1.0 if CALLS["n"] <= 16 else 0.0
