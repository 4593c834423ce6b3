"""Reinforcement learning from a reward: rollouts (sampling, layout, token log-probs) and
rewards (classifier, Bradley-Terry reward model, a Python function). The losses are pure
functions in :mod:`lmforge.losses.rl`; the task that ties them together is
:mod:`lmforge.tasks.rl`, trained by the one engine's on-policy phase."""
