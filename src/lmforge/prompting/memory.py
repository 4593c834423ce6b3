"""Chat memory: what of a conversation goes into the next prompt, within a token budget.

- ``full``: every turn (the oldest turns are dropped only when the budget forces it);
- ``window:N``: the last N exchanges (user + assistant turns);
- ``summary``: when the conversation outgrows the budget, the oldest turns are summarised by the
  model into one system note (folded into the previous summary), and the latest turns stay verbatim.

In every mode the rendered prompt (chat template included) stays within ``budget`` tokens: turns
are dropped oldest first as a last resort, so the model's context is never exceeded.
"""
from __future__ import annotations

from collections.abc import Callable

from ..errors import LmforgeError

SUMMARISE = ("Summarise this conversation in at most three sentences, keeping names, numbers and "
             "decisions.\n\n{previous}{turns}")


def parse_memory(spec: str) -> tuple[str, int | None]:
    """``"full"`` / ``"window:N"`` / ``"summary"`` -> (kind, N)."""
    kind, _, arg = (spec or "").partition(":")
    if kind in ("full", "summary") and not arg:
        return kind, None
    if kind == "window":
        if not arg.isdigit() or int(arg) < 1:
            raise LmforgeError(f"--memory window:N needs a positive integer N, got '{spec}'")
        return kind, int(arg)
    raise LmforgeError(f"--memory must be full, window:N or summary, got '{spec}'")


class ChatMemory:
    """Turns of a conversation and the messages to send, within ``budget`` prompt tokens.

    Args:
        spec: ``full``, ``window:N`` or ``summary``.
        count_tokens: messages -> prompt tokens (the chat template applied).
        summarise: text -> summary (the model), needed for ``summary``.
        budget: prompt tokens at most (None: unlimited).
    """

    def __init__(self, spec: str, count_tokens: Callable[[list[dict]], int], budget: int | None,
                 summarise: Callable[[str], str] | None = None, keep_last: int = 2):
        self.kind, self.window = parse_memory(spec)
        if self.kind == "summary" and summarise is None:
            raise LmforgeError("summary memory needs a model to summarise with")
        self.count, self.budget, self.summarise, self.keep_last = count_tokens, budget, summarise, keep_last
        self.turns: list[dict] = []
        self.summary = ""
        self.dropped = 0

    def reset(self) -> None:
        self.turns, self.summary, self.dropped = [], "", 0

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})

    def _with_summary(self, turns: list[dict]) -> list[dict]:
        if not self.summary:
            return turns
        return [{"role": "system", "content": f"Summary of the earlier conversation: {self.summary}"}] + turns

    def _fits(self, msgs: list[dict]) -> bool:
        return self.budget is None or self.count(msgs) <= self.budget

    def messages(self) -> list[dict]:
        """The messages for the next reply; the newest turn (the user's question) always stays."""
        if self.kind == "window":
            start = len(self.turns) - 1  # the current user turn plus N earlier exchanges
            exchanges = 0
            while start >= 2 and exchanges < self.window:
                start -= 2
                exchanges += 1
            if start > 0:
                self.dropped += start
                self.turns = self.turns[start:]
        if self.kind == "summary":
            while not self._fits(self._with_summary(self.turns)) and len(self.turns) > 1 + self.keep_last:
                cut = max(2, len(self.turns) - 1 - self.keep_last)
                cut -= cut % 2  # whole exchanges
                old, self.turns = self.turns[:cut], self.turns[cut:]
                text = "\n".join(f"{t['role']}: {t['content']}" for t in old)
                prev = f"Earlier summary: {self.summary}\n" if self.summary else ""
                self.summary = self.summarise(SUMMARISE.format(previous=prev, turns=text)).strip()
        msgs = self._with_summary(self.turns)
        while not self._fits(msgs) and len(self.turns) > 1:  # last resort: drop the oldest turns
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[1:]
            self.dropped += 1
            msgs = self._with_summary(self.turns)
        if not self._fits(msgs) and self.summary:
            self.summary = ""
            msgs = self.turns
        if not self._fits(msgs):
            raise LmforgeError(f"the message alone takes {self.count(msgs)} tokens, more than the "
                               f"budget of {self.budget}")
        return msgs

    def show(self) -> str:
        """What the model will see (for ``/memory``)."""
        head = f"memory {self.kind}" + (f":{self.window}" if self.window else "")
        head += f", budget {self.budget} tokens" if self.budget else ""
        msgs = self._with_summary(self.turns)
        used = self.count(msgs) if msgs else 0
        lines = [f"[{head}; {len(self.turns)} turns kept, {used} tokens]"]
        lines += [f"{m['role']}: {m['content']}" for m in msgs]
        return "\n".join(lines)
