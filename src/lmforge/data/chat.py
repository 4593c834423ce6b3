"""Causal-LM examples: chat templates, target masking, truncation accounting and packing.

Three record formats become token ids plus *labels* (the token id where the position is a
training target, ``-100`` elsewhere):

- chat ``messages`` (``[{"role", "content"}, ...]``): every assistant turn is a target;
- ``prompt`` + ``completion``: the completion is the target; with a chat template the prompt
  becomes a user turn (or the given message list; HH-RLHF transcripts ``"Human: ...
  \\n\\nAssistant:"`` are split into turns, see :func:`parse_hh_dialogue`) and the completion
  the assistant turn; without one (``template="raw"``) the texts are tokenised as they are;
- plain ``text``: every token is a target.

Each template segment is tokenised on its own, in order, so the prompt tokens are exactly the
ones generation sees (``apply_chat_template(..., add_generation_prompt=True)``). Every target
ends with EOS: an assistant segment is trained up to and including the template's EOS (e.g.
ChatML's ``<|im_end|>`` when it is the tokenizer's EOS) and the formatting after it (the
newline) is context only; when the segment holds no EOS one is appended.

The labels are then turned into next-token *targets* (``targets[t] = labels[t + 1]``) per
sample, before any packing, so no position is ever trained to predict the first token of the
next packed sample.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import LmforgeError

IGNORE = -100
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


# ---- message helpers -----------------------------------------------------------------------------
def parse_hh_dialogue(text: str) -> list[dict]:
    """Split an Anthropic HH-RLHF transcript into chat messages.

    ``"Human: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` becomes
    ``[user a, assistant b, user c]``: the trailing empty ``Assistant:`` is the cue for the
    completion and is dropped (the chat template's generation prompt takes its place).

    Raises:
        LmforgeError: when the text does not start with a ``Human:`` turn.
    """
    src = text.lstrip("\n")
    marks = list(_HH_TURN.finditer(src))
    if not marks or marks[0].start() != 0 or marks[0].group(1) != "Human":
        raise LmforgeError("not an HH transcript (expected it to start with 'Human:')")
    out = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(src)
        content = src[m.end():end].strip()
        role = "user" if m.group(1) == "Human" else "assistant"
        if i == len(marks) - 1 and role == "assistant" and not content:
            break
        out.append({"role": role, "content": content})
    return out


def looks_like_hh(text: str) -> bool:
    """True for ``"Human: ...\\n\\nAssistant:"`` transcripts (HH-RLHF prompts)."""
    s = text.lstrip("\n")
    return s.startswith("Human:") and s.rstrip().endswith("\n\nAssistant:")


def check_messages(value, what: str = "messages") -> list[dict]:
    """Validate a list of ``{"role": str, "content": str}``; returns it."""
    if not isinstance(value, list) or not value:
        raise LmforgeError(f"'{what}' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LmforgeError(f"'{what}' message {i + 1} must be an object with text 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_messages(prompt, style: str = "auto") -> list[dict]:
    """A prompt (text or messages) as chat messages.

    ``style``: ``"plain"`` makes a text one user turn, ``"hh"`` parses it with
    :func:`parse_hh_dialogue`, ``"auto"`` parses texts that look like HH transcripts.
    """
    if isinstance(prompt, list):
        return check_messages(prompt, "prompt")
    if style == "hh" or (style == "auto" and looks_like_hh(prompt)):
        return parse_hh_dialogue(prompt)
    return [{"role": "user", "content": prompt}]


def completion_text(value, what: str = "completion") -> str:
    """A completion given as text, or as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(value, str):
        return value
    msgs = check_messages(value, what)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise LmforgeError(f"'{what}' as messages must be exactly one assistant message")
    return msgs[0]["content"]


# ---- encoding ------------------------------------------------------------------------------------
@dataclass
class Formatter:
    """Turns records into token ids and labels for one tokenizer.

    Attributes:
        tokenizer: a Hugging Face tokenizer.
        chat: use the tokenizer's chat template (else raw text).
        prompt_style: how text prompts become messages in chat mode (see :func:`prompt_messages`).
    """

    tokenizer: object
    chat: bool
    prompt_style: str = "auto"
    eos_id: int = field(init=False)

    def __post_init__(self):
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            raise LmforgeError("the tokenizer has no EOS token; causal-LM targets need one")
        self.eos_id = int(eos)
        if self.chat and not getattr(self.tokenizer, "chat_template", None):
            raise LmforgeError("the tokenizer has no chat template; use template: raw")

    @classmethod
    def create(cls, tokenizer, template: str = "auto", prompt_style: str = "auto") -> "Formatter":
        """``template``: ``"chat"``, ``"raw"``, or ``"auto"`` (chat when the tokenizer has a template)."""
        chat = template == "chat" or (template == "auto" and bool(getattr(tokenizer, "chat_template", None)))
        return cls(tokenizer, chat, prompt_style)

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []

    def _render(self, messages: list[dict], gen: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _target_segment(self, text: str) -> tuple[list[int], list[int]]:
        """A completion segment: trained through its last EOS (appended when missing)."""
        ids = self._ids(text)
        if self.eos_id in ids:
            cut = len(ids) - ids[::-1].index(self.eos_id)  # one past the last EOS
            return ids, ids[:cut] + [IGNORE] * (len(ids) - cut)
        ids = ids + [self.eos_id]
        return ids, list(ids)

    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of a prompt as generation sees it (chat: with the generation prompt)."""
        if self.chat:
            return self._ids(self._render(prompt_messages(prompt, self.prompt_style), gen=True))
        if not isinstance(prompt, str):
            raise LmforgeError("chat-message prompts need a chat template (template: chat)")
        return self._ids(prompt, special=True)

    def generation_prompt(self, prompt):
        """What :func:`lmforge.generation.generate` takes for this prompt (messages or raw text)."""
        return prompt_messages(prompt, self.prompt_style) if self.chat else prompt

    def encode_completion(self, prompt, completion: str) -> tuple[list[int], list[int], list[int]]:
        """``(prompt_ids, completion_ids, completion_labels)`` for one prompt/completion pair."""
        if not self.chat:
            return self.prompt_ids(prompt), *self._target_segment(completion)
        msgs = prompt_messages(prompt, self.prompt_style)
        head = self._render(msgs, gen=True)
        full = self._render(msgs + [{"role": "assistant", "content": completion}])
        if not full.startswith(head):
            raise LmforgeError("the chat template does not extend the prompt with the reply; use template: raw")
        return self._ids(head), *self._target_segment(full[len(head):])

    def encode_messages(self, messages: list[dict], train_on: str = "completion") -> tuple[list[int], list[int]]:
        """Ids and labels of a conversation; assistant turns are targets (``train_on="all"``: every token)."""
        msgs = check_messages(messages)
        if not self.chat:
            raise LmforgeError("chat 'messages' need a chat template; the tokenizer has none")
        ids: list[int] = []
        labels: list[int] = []
        done = ""  # text already tokenised
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise LmforgeError("a conversation must not start with an assistant message")
            head = self._render(msgs[:i], gen=True)
            full = self._render(msgs[:i + 1])
            if not head.startswith(done) or not full.startswith(head):
                raise LmforgeError("the chat template is not incremental over turns; use the prompt/completion format")
            ctx = self._ids(head[len(done):])
            seg, seg_labels = self._target_segment(full[len(head):])
            ids += ctx + seg
            labels += [IGNORE] * len(ctx) + seg_labels
            done = full
        if not done:
            raise LmforgeError("the conversation has no assistant message to train on")
        rest = self._render(msgs)
        tail = self._ids(rest[len(done):]) if rest.startswith(done) else []
        ids += tail
        labels += [IGNORE] * len(tail)
        if train_on == "all":
            labels = list(ids)
        return ids, labels

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """Plain text: every token is a target, EOS appended."""
        ids = self._ids(text, special=True) + [self.eos_id]
        return ids, list(ids)


# ---- targets, truncation, reporting ----------------------------------------------------------------
def next_token_targets(labels: Sequence[int]) -> list[int]:
    """``targets[t] = labels[t + 1]``, ``targets[-1] = -100``: what position ``t`` is trained to predict."""
    return list(labels[1:]) + [IGNORE] if len(labels) else []


@dataclass
class DropReport:
    """Counts of truncated and dropped samples with the first example of each reason."""

    split: str
    total: int = 0
    truncated: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> [count, first location]

    def drop(self, reason: str, where: str) -> None:
        entry = self.dropped.setdefault(reason, [0, where])
        entry[0] += 1

    @property
    def n_dropped(self) -> int:
        return sum(c for c, _ in self.dropped.values())

    def lines(self) -> list[str]:
        """One human-readable line per reason (and one for truncation)."""
        out = []
        if self.truncated:
            out.append(f"{self.split}: {self.truncated} of {self.total} samples truncated to the max length")
        for reason, (n, where) in self.dropped.items():
            out.append(f"{self.split}: dropped {n} of {self.total} samples: {reason} (first: {where})")
        return out

    def as_dict(self) -> dict:
        return {"total": self.total, "truncated": self.truncated,
                "dropped": {r: {"count": n, "first": w} for r, (n, w) in self.dropped.items()}}


def truncate_right(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Keep the first ``max_length`` tokens; returns (ids, labels, was_truncated)."""
    if len(ids) <= max_length:
        return ids, labels, False
    return ids[:max_length], labels[:max_length], True


def truncate_prompt_left(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Fit ``max_length`` by dropping the prompt's first tokens, keeping the reply whole where it fits.

    With ``p`` the index of the first target label (``labels[p] != -100``; ``p = len`` when none) and
    ``excess = len(ids) - max_length > 0``, the first ``c = min(excess, max(p - 1, 0))`` tokens go (one
    prompt token stays, so the reply's first token is still predicted); if the rest is still too long
    (the reply alone nearly fills ``max_length``) it is cut on the right. The end of a long
    prompt (the latest turn, the question) is what the reply depends on most, so a multi-turn sample
    keeps its reply instead of losing every target token to right truncation.
    Returns (ids, labels, was_truncated)."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, labels, False
    p = next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))
    c = min(excess, max(p - 1, 0))
    ids, labels = ids[c:], labels[c:]
    return ids[:max_length], labels[:max_length], True


def make_item(ids: list[int], labels: list[int]) -> dict | None:
    """An SFT item ``{input_ids, targets}``, or None when no position is a target."""
    targets = next_token_targets(labels)
    if all(t == IGNORE for t in targets):
        return None
    return {"input_ids": ids, "targets": targets}


# ---- packing and collation --------------------------------------------------------------------------
def pack_items(items: Sequence[dict], max_length: int) -> list[dict]:
    """Pack samples into rows of at most ``max_length`` tokens (first-fit decreasing).

    Each row concatenates whole samples; ``position_ids`` restart at 0 for every sample, which
    tells the model (transformers' packed-sequence masks) not to attend across samples.
    Returns rows ``{input_ids, targets, position_ids, sample_ids, n_samples}``; ``sample_ids``
    gives, per token, the index of its sample in ``items``.
    """
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(items[i]["input_ids"])
        if n > max_length:
            raise LmforgeError(f"sample of {n} tokens does not fit a packed row of {max_length}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    rows = []
    for members in bins:
        row = {"input_ids": [], "position_ids": [], "sample_ids": [], "n_samples": len(members)}
        if "targets" in items[members[0]]:
            row["targets"] = []
        for i in members:
            it = items[i]
            n = len(it["input_ids"])
            row["input_ids"] += it["input_ids"]
            if "targets" in row:
                row["targets"] += it["targets"]
            row["position_ids"] += list(range(n))
            row["sample_ids"] += [i] * n
        rows.append(row)
    return rows


def collate_causal(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (and ``targets`` when the items have them) into a batch.

    Unpacked items get an ``attention_mask`` (B, T). Packed rows get ``position_ids`` (B, T)
    whose padding restarts at 0 (a separate segment that nothing attends to), ``sample_ids``
    (B, T; -1 on padding) and a ``token_mask`` (B, T) of real tokens instead of an attention mask.
    """
    width = max(len(it["input_ids"]) for it in items)
    n = len(items)
    ids = torch.full((n, width), pad_id, dtype=torch.long)  # (B, T)
    has_targets = "targets" in items[0]
    targets = torch.full((n, width), IGNORE, dtype=torch.long) if has_targets else None  # (B, T)
    real = torch.zeros((n, width), dtype=torch.long)  # (B, T)
    packed = "position_ids" in items[0]
    pos = torch.zeros((n, width), dtype=torch.long) if packed else None  # (B, T)
    sid = torch.full((n, width), -1, dtype=torch.long) if packed else None  # (B, T)
    for r, it in enumerate(items):
        k = len(it["input_ids"])
        ids[r, :k] = torch.as_tensor(it["input_ids"], dtype=torch.long)
        if has_targets:
            targets[r, :k] = torch.as_tensor(it["targets"], dtype=torch.long)
        real[r, :k] = 1
        if packed:
            pos[r, :k] = torch.as_tensor(it["position_ids"], dtype=torch.long)
            pos[r, k:] = torch.arange(width - k)
            sid[r, :k] = torch.as_tensor(it["sample_ids"], dtype=torch.long)
    batch = {"input_ids": ids}
    if has_targets:
        batch["targets"] = targets
    if packed:
        batch["position_ids"] = pos
        batch["sample_ids"] = sid
        batch["token_mask"] = real
    else:
        batch["attention_mask"] = real
    return batch
