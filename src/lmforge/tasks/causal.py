"""What the causal-LM tasks (sft, preference, reward) share: model building, forward, I/O.

- The model is loaded from a resolved folder as ``AutoModelForCausalLM`` (or, for reward models,
  ``AutoModelForSequenceClassification`` with one label) in fp32 master weights, then per mode:
  ``full`` (everything trains), ``lora`` (LoRA on every linear projection by default) or
  ``qlora`` (the frozen base Linear layers become 4-bit NF4 first, LoRA trains on top).
- The forward runs the decoder only (``model.get_decoder()``) and returns the final hidden
  states; the losses project them through the LM head chunk by chunk
  (:mod:`lmforge.losses.lm`), so full ``(B, T, V)`` logits are never materialised.
- Runs are saved as a PEFT adapter folder (``adapter/``, task type ``CAUSAL_LM`` or
  ``SEQ_CLS``) or, for full fine-tuning, a Hugging Face model folder (``model/``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field
from torch import nn

from ..config import RunConfig, Section
from ..data.chat import DropReport, Formatter, collate_causal, pack_items
from ..device import Placement
from ..errors import LmforgeError
from ..models import load_tokenizer, resolve_model
from .base import Task
from .common import ADAPTER_MODES, add_adapter, atomic_dir, load_run_adapter, open_run, write_json

log = logging.getLogger(__name__)

LORA_DEFAULTS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
HEADS = ["score"]


class CausalSection(Section):
    """Options every causal-LM task shares."""

    mode: Literal["full", "lora", "adapter", "qlora"] = Field(
        "lora", description="full fine-tuning; lora/adapter: the adapter: section's kind; qlora: that on a 4-bit NF4 base")
    template: Literal["auto", "chat", "raw"] = Field(
        "auto", description="chat: the tokenizer's chat template; raw: texts as they are; auto: chat if it has one")
    prompt_style: Literal["auto", "plain", "hh"] = Field(
        "auto", description="text prompts in chat mode: one user turn (plain), an HH transcript split into "
                            "turns (hh), or hh when the text looks like one (auto)")
    prompt_template: str | None = Field(
        None, description="build the prompt from the record's columns, e.g. 'Summarize:\\n{dialogue}'")
    quant_block_size: int = Field(64, gt=0, description="qlora: NF4 block size")
    chunk_size: int = Field(1024, gt=0, description="rows per logits tile in the chunked LM loss")


def decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states of the decoder (after its last norm), without the LM head.

    Returns:
        (B, T, H) hidden states.
    """
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return model.get_decoder()(**kw).last_hidden_state  # (B, T, H)


def output_projection(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's ``(weight (V, H), bias (V,) or None)``."""
    from ..adapters.base import AdapterLayer

    head = model.get_output_embeddings()
    if head is None:
        raise LmforgeError("the model has no LM head (get_output_embeddings() is None)")
    if isinstance(head, AdapterLayer):
        raise LmforgeError("adapters on the LM head are not supported; remove lm_head from adapter.target_modules")
    return head.weight, getattr(head, "bias", None)


@torch.no_grad()
def store_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen floating-point parameters in the autocast dtype (adapter modes).

    Autocast casts every fp32 weight to ``dtype`` in every forward and keeps the copies for
    backward; storing the frozen base in ``dtype`` once removes that traffic and halves its
    memory, and the residual stream then runs in ``dtype`` too, as in a bf16 model. Trainable
    parameters (LoRA matrices, saved heads) stay fp32 master weights, and buffers (e.g. rotary
    frequencies) are left alone. Forward passes must run under ``Placement.autocast()``.

    Returns:
        The number of parameters converted.
    """
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


@torch.no_grad()
def packing_supported(model: nn.Module, placement: Placement) -> bool:
    """Whether the model keeps packed samples apart when their position ids restart at 0.

    Runs two 3-token samples packed in one row and separately and compares the hidden states
    (transformers' packed-sequence masks cover Llama, Mistral, Qwen, Gemma ...; an architecture
    without them would let the second sample attend to the first).
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = (torch.arange(6, device=device) * 7 + 3).remainder(vocab)[None]  # (1, 6)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    with placement.autocast():
        packed = decoder_hidden(model, ids, position_ids=pos).float()  # (1, 6, H)
        apart = torch.cat([decoder_hidden(model, ids[:, :3]), decoder_hidden(model, ids[:, 3:])], 1).float()
    return bool((packed - apart).abs().max() <= 2e-2 * apart.abs().max() + 1e-4)


def load_base(folder: Path, tokenizer, *, reward: bool = False, trust_remote_code: bool = False,
              attn_implementation: str | None = None) -> nn.Module:
    """The plain Hugging Face model (fp32) from a resolved folder, with the given attention
    kernel (``Placement.attn_implementation``; None: transformers' default), through the
    package's one causal-LM loader (:func:`lmforge.causal_lm.load_pretrained`)."""
    from ..causal_lm import load_pretrained

    return load_pretrained(folder, tokenizer=tokenizer, reward=reward, trust_remote_code=trust_remote_code,
                           attn_implementation=attn_implementation)


class CausalTask(Task):
    """Base of the causal-LM tasks: subclasses set ``section``, implement ``load_data`` and the loss."""

    section = "sft"
    reward_head = False
    peft_task_type = "CAUSAL_LM"

    def __init__(self, cfg: RunConfig, *, with_data: bool = True, model_dir: str | Path | None = None,
                 adapter_dir: str | Path | None = None):
        self.cfg = cfg
        self.opts = getattr(cfg, self.section)
        self.placement = Placement.resolve(cfg.model.device, cfg.model.precision)
        self.folder = Path(model_dir) if model_dir else resolve_model(cfg.model.name, cfg.model.revision)
        self.tokenizer = load_tokenizer(self.folder, cfg.model.trust_remote_code)
        self.fmt = Formatter.create(self.tokenizer, self.opts.template, self.opts.prompt_style)
        self.reports: list[DropReport] = []
        self.train_items, self.eval_items = [], []
        if with_data:
            self.load_data()  # bad data fails before the model is loaded
        torch.manual_seed(cfg.seed)  # new heads and LoRA matrices start the same in every run
        self.model = self.build_model(adapter_dir, full=model_dir is not None)
        if getattr(self.opts, "packing", False) and not packing_supported(self.model, self.placement):
            raise LmforgeError(f"this model attends across packed samples (no position-id packing support); "
                               f"set {self.section}.packing: false")

    # ---- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        raise NotImplementedError

    def report(self, rep: DropReport) -> None:
        """Log truncation/drop counts (one line each) and keep them for the run's data report."""
        self.reports.append(rep)
        for line in rep.lines():
            log.warning(line)

    # ---- model -----------------------------------------------------------------------------
    @property
    def adapters(self) -> bool:
        return self.opts.mode in ADAPTER_MODES

    def build_model(self, adapter_dir=None, full: bool = False) -> nn.Module:
        """Base model, quantised for qlora, with fresh LoRA (or the saved adapter) for adapter modes."""
        mc = self.cfg.model
        model = load_base(self.folder, self.tokenizer, reward=self.reward_head, trust_remote_code=mc.trust_remote_code,
                          attn_implementation=self.placement.attn_implementation(mc.attn_implementation,
                                                                                self.cfg.data.max_length))
        if full or not self.adapters:
            return model
        if self.opts.mode == "qlora":
            from ..quant.nf4 import quantize_model

            quantize_model(model, block_size=self.opts.quant_block_size)
        if adapter_dir is not None:
            load_run_adapter(model, self.cfg, adapter_dir)
        else:
            heads = HEADS if self.reward_head else []
            add_adapter(model, self.cfg, LORA_DEFAULTS, heads, self.tokenizer)
        if self.placement.autocast_enabled and mc.frozen_in_compute_dtype:
            store_frozen(model, self.placement.dtype)
        return model

    def describe_model(self) -> str:
        from ..adapters.lora import format_trainable, trainable_parameters

        return f"{self.name} ({self.opts.mode}): " + format_trainable(trainable_parameters(self.model))

    @property
    def core(self) -> nn.Module:
        """The model (the engine never wraps it; kept for callers of ``task.core``)."""
        return self.model

    def collate_sequences(self, seqs: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Sequences (``input_ids``, optional ``targets``) packed into rows when ``packing``, else padded.

        Packed rows are at most ``max(data.max_length, longest sequence)`` tokens wide, or as
        wide as the longest sequence when that selects the eager attention kernel (see
        :meth:`attention_for`).
        """
        if getattr(self.opts, "packing", False):
            longest = max(len(s["input_ids"]) for s in seqs)
            width = max(self.cfg.data.max_length, longest)
            if self.attention_for(longest) == "eager":  # eager's cost grows with the row width
                width = longest
            return collate_causal(pack_items(seqs, width), self.tokenizer.pad_token_id)
        return collate_causal(seqs, self.tokenizer.pad_token_id)

    def batch_tokens(self, batch: dict) -> int:
        """Real (non-padding) tokens in a collated batch."""
        return int(batch.get("attention_mask", batch.get("token_mask")).sum())

    def hidden(self, batch: dict, model: nn.Module | None = None) -> torch.Tensor:
        """(B, T, H) final hidden states for a collated batch (packed rows use their position ids).

        Right padding needs no attention mask for the real tokens (they never attend forward),
        so the plain causal mask is used: that keeps SDPA on its fast causal path.
        """
        model = self.model if model is None else model
        self.use_attention(model, batch["input_ids"].shape[1])
        return decoder_hidden(model, batch["input_ids"], None, batch.get("position_ids"))

    def attention_for(self, width: int) -> str:
        """The attention kernel for rows of ``width`` tokens (``lmforge.device`` decides)."""
        return self.placement.attn_implementation(self.cfg.model.attn_implementation, width)

    def use_attention(self, model: nn.Module, width: int) -> None:
        """Switch the model to the faster attention kernel for rows of ``width`` tokens (no-op when
        unchanged or when the model cannot switch)."""
        want = self.attention_for(width)
        if getattr(model.config, "_attn_implementation", want) != want and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(want)

    # ---- saving and loading ------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        """``adapter/`` (PEFT format) for lora/qlora, ``model/`` (HF folder + tokenizer) for full."""
        model = self.core
        if self.adapters:
            from ..adapters.peft_io import save_adapter

            save_adapter(model, out_dir / "adapter", base_model_name_or_path=str(self.cfg.model.name),
                         task_type=self.peft_task_type)
        else:
            with atomic_dir(out_dir / "model") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
        if self.reports:
            write_json(out_dir / "data_report.json", {r.split: r.as_dict() for r in self.reports})

    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "final") -> "CausalTask":
        """The trained model of a run (``which="best"``: the best checkpoint's artefact), in eval mode."""
        run_dir = Path(run_dir)
        opened = open_run(run_dir, which)
        cfg, art = opened.config, opened.root
        opts = getattr(cfg, cls.section)
        if opts.mode in ADAPTER_MODES:
            if not (art / "adapter").is_dir():
                raise LmforgeError(f"{art}: no adapter/ folder (was the run finished?)")
            task = cls(cfg, with_data=False, adapter_dir=art / "adapter")
        else:
            if not (art / "model").is_dir():
                raise LmforgeError(f"{art}: no model/ folder (was the run finished?)")
            task = cls(cfg, with_data=False, model_dir=art / "model")
        task.model.to(task.placement.device).eval()
        return task

    def prompt_value(self, record: dict, column: str, where: str):
        """The record's prompt: ``prompt_template`` formatted with its columns when set, else the column."""
        tpl = self.opts.prompt_template
        if tpl is None:
            if column not in record:
                raise LmforgeError(f"{where}: missing column '{column}' (columns: {', '.join(list(record)[:8])})")
            return record[column]
        try:
            return tpl.format_map(record)
        except KeyError as exc:
            raise LmforgeError(f"{where}: prompt_template needs column {exc.args[0]!r}") from None
        except (ValueError, IndexError) as exc:
            raise LmforgeError(f"prompt_template is malformed ({exc})") from None
