"""The one causal-LM loader: a model reference, run directory or adapter folder -> model + tokenizer.

A source is a model reference (anything :func:`lmforge.models.resolve_model` accepts), a run
directory (its typed config and artefact through :func:`lmforge.rundir.open_run`: ``adapter/`` in
PEFT format or ``model/`` as a Hugging Face folder) or an adapter folder. A run trained on a 4-bit
base (``mode: qlora``) is loaded on the same NF4 base it was trained on.

:func:`load_pretrained` is the single ``from_pretrained`` call for causal LMs (and for reward
models: the same decoder with a one-label sequence-classification head); the causal-LM tasks,
``generate``, ``chat``, ``merge``, prompting and the API all load through it. Encoder-decoder
models (T5, FLAN-T5, BART: ``is_encoder_decoder`` in the config) load through it too, as
``AutoModelForSeq2SeqLM``; the paths that take them pass ``seq2seq_ok=True`` and the forward
pieces they share (:func:`seq2seq_hidden`, :func:`seq2seq_head`, :func:`shift_right`) are here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LmforgeError
from .rundir import is_run_dir, open_run


def is_seq2seq(model) -> bool:
    """True for an encoder-decoder model (T5, BART ...: ``config.is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def load_pretrained(folder: str | Path, *, tokenizer=None, reward: bool = False, trust_remote_code: bool = False,
                    attn_implementation: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The plain Hugging Face causal LM (or, ``reward=True``, a one-label sequence classifier on
    the same decoder, padded with ``tokenizer``'s pad token) from a resolved folder, with the
    given attention kernel (None: transformers' default). An encoder-decoder folder
    (``is_encoder_decoder`` in its config: T5, FLAN-T5, BART ...) loads as ``AutoModelForSeq2SeqLM``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    what = "reward" if reward else "causal LM"
    try:
        hf_cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        seq2seq = bool(getattr(hf_cfg, "is_encoder_decoder", False))
        if seq2seq and reward:
            from .models import read_model_config, seq2seq_refusal

            raise seq2seq_refusal(folder, read_model_config(folder), "task reward")
        if seq2seq:
            what = "seq2seq LM"
        if reward:
            hf_cfg.num_labels = 1
            hf_cfg.id2label, hf_cfg.label2id = {0: "reward"}, {"reward": 0}
            hf_cfg.pad_token_id = tokenizer.pad_token_id
        cls = AutoModelForSequenceClassification if reward else AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return cls.from_pretrained(str(folder), config=hf_cfg, trust_remote_code=trust_remote_code, dtype=dtype,
                                   **attn)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LmforgeError(f"{folder}: cannot load a {what} model ({first})") from None


def read_base_tensor(folder: str | Path, name: str) -> torch.Tensor | None:
    """One tensor of a model folder's safetensors weights (single file or sharded), read without
    loading the model; None when they do not hold it. Pickled ``.bin`` weights are never read here."""
    from safetensors import safe_open

    from .models import weight_files

    for f in weight_files(Path(folder)):
        try:
            with safe_open(str(f), framework="pt") as h:
                if name in h.keys():
                    return h.get_tensor(name)
        except Exception as err:  # a garbled shard
            raise LmforgeError(f"{f}: cannot read '{name}' ({str(err).splitlines()[0][:120]})") from None
    return None


# ---- encoder-decoder forward pieces (sft, generation, merge) ---------------------------------------
def decoder_start_id(model) -> int:
    """The token the decoder starts from (T5: pad; BART: EOS), from the model's configs."""
    for cfg in (getattr(model, "generation_config", None), model.config):
        value = getattr(cfg, "decoder_start_token_id", None)
        if isinstance(value, int):
            return value
    pad = getattr(model.config, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    raise LmforgeError("the seq2seq model has no decoder_start_token_id (nor pad_token_id) in its config")


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: ``[start, y_0, ..., y_{T-2}]`` with ignored (-100)
    positions fed as padding. (B, T) -> (B, T)."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == -100, pad_id)


def right_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front (right padding), keeping their order: encoders with
    learned absolute positions (BART) read a left-padded row at shifted positions. (B, S) each."""
    mask = attention_mask.long()
    order = torch.sort(1 - mask, dim=1, stable=True).indices  # (B, S) real tokens first
    return input_ids.gather(1, order), mask.gather(1, order)


def encode_source(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The encoder's final hidden states. (B, S) -> (B, S, H)."""
    return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def seq2seq_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   decoder_input_ids: torch.Tensor, decoder_attention_mask: torch.Tensor | None = None,
                   encoder_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Final decoder hidden states, before the LM head (see :func:`seq2seq_head`).

    Args:
        input_ids, attention_mask: (B, S) source tokens and mask.
        decoder_input_ids: (B, T) right-shifted targets (:func:`shift_right`).
        decoder_attention_mask: (B, T) or None (causal mask only: right padding needs none).
        encoder_hidden: (B, S, H) when the encoder already ran.

    Returns:
        (B, T, H) hidden states.
    """
    if encoder_hidden is None:
        encoder_hidden = encode_source(model, input_ids, attention_mask)  # (B, S, H)
    return model.get_decoder()(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                               encoder_hidden_states=encoder_hidden, encoder_attention_mask=attention_mask,
                               use_cache=False).last_hidden_state  # (B, T, H)


def seq2seq_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(weight (V, H), bias (V,) or None, scale)`` with ``logits = scale * h @ W.T + b``.

    T5-style models with tied embeddings scale the decoder output by ``d_model ** -0.5``
    (``config.scale_decoder_outputs``); BART-style models add ``final_logits_bias`` (1, V).
    """
    from .adapters.base import AdapterLayer

    head = model.get_output_embeddings()
    if head is None or isinstance(head, AdapterLayer):
        raise LmforgeError("the seq2seq model's LM head is missing or wrapped by an adapter "
                           "(remove lm_head from adapter.target_modules)")
    bias = getattr(head, "bias", None)
    flb = getattr(model, "final_logits_bias", None)
    if isinstance(flb, torch.Tensor):
        bias = flb.reshape(-1) if bias is None else bias + flb.reshape(-1)
    scale = 1.0
    if getattr(model.config, "scale_decoder_outputs", False):
        scale = float(model.config.d_model) ** -0.5
    return head.weight, bias, scale


def seq2seq_response_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            response_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Decoder hidden states that predict each response token, scaled for the LM head: with
    ``(W, b, _) = seq2seq_head(model)``, ``log_softmax(h @ W.T + b)[b, t, response_ids[b, t]]`` is
    ``log p(r_t | r_<t, x)``. The seq2seq counterpart of a causal LM's hidden states at the
    positions before each response token (RL rollouts, scoring).

    Args:
        input_ids, attention_mask: (B, S) prompts (any padding side: the mask says which are real).
        response_ids: (B, L) right-padded responses (-100 or ``pad_id`` after each one's end).

    Returns:
        (B, L, H) hidden states.
    """
    input_ids, attention_mask = right_align(input_ids, attention_mask)
    start = decoder_start_id(model)
    dec_in = shift_right(response_ids.masked_fill(response_ids < 0, pad_id), start, pad_id)  # (B, L)
    h = seq2seq_hidden(model, input_ids, attention_mask, dec_in)  # (B, L, H)
    scale = seq2seq_head(model)[2]
    return h * scale if scale != 1.0 else h


#: seq2seq adapter targets when adapter.target_modules is unset: T5 (q k v o, wi/wi_0/wi_1 wo) and BART
#: (q_proj k_proj v_proj out_proj, fc1 fc2) attention and feed-forward projections
SEQ2SEQ_TARGETS = ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo",
                   "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


#: peft's T5 placements for kinds whose own defaults name BERT/Llama/BART modules only
T5_KIND_DEFAULTS = {"ia3": {"target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"]},
                    "bottleneck": {"pfeiffer": r".*DenseReluDense\.wo",
                                   "houlsby": r".*(SelfAttention\.o|DenseReluDense\.wo)"}}


def seq2seq_adapter_options(kind: str, options: dict, model: nn.Module) -> dict:
    """``adapter:`` options with T5 defaults filled in when unset: IA3 on keys, values and the
    feed-forward output ``wo`` (peft's T5 mapping); bottleneck adapters after the feed-forward
    output (pfeiffer) or also after the self-attention output (houlsby). Others unchanged."""
    opts = dict(options)
    t5_like = any(n.endswith("DenseReluDense.wo") for n, _ in model.named_modules())
    if not t5_like or opts.get("target_modules") is not None or kind not in T5_KIND_DEFAULTS:
        return opts
    if kind == "ia3":
        return T5_KIND_DEFAULTS["ia3"] | {k: v for k, v in opts.items() if v is not None}
    return opts | {"target_modules": T5_KIND_DEFAULTS["bottleneck"][opts.get("placement") or "pfeiffer"]}


def collate_seq2seq(items: Sequence[dict], pad_id: int, start_id: int) -> dict[str, torch.Tensor]:
    """Right-padded encoder inputs and teacher-forcing decoder inputs.

    Returns ``input_ids``/``attention_mask`` (B, S); with labels, ``targets`` (B, T; -100 on padding)
    and ``decoder_input_ids`` (B, T) = ``[start, y_0 .. y_{T-2}]`` (padding fed as ``pad_id``).
    """
    from .data.batching import attention_mask, pad_sequences

    batch = {"input_ids": pad_sequences([it["input_ids"] for it in items], pad_id),  # (B, S)
             "attention_mask": attention_mask([it["input_ids"] for it in items])}
    if "labels" in items[0]:
        targets = pad_sequences([it["labels"] for it in items], -100)  # (B, T)
        batch["targets"] = targets
        batch["decoder_input_ids"] = shift_right(targets, start_id, pad_id)  # (B, T)
    return batch


@dataclass
class Source:
    """What to load: the base model reference, an optional adapter folder, and where it came from."""

    base: str
    adapter: Path | None = None
    base_4bit: bool = False
    run_dir: Path | None = None
    quant_block_size: int = 64


def _read_run(run: Path, src: Source) -> str:
    """Fill ``src`` from a run's typed config (run dir, ``mode: qlora`` base, NF4 block size);
    return the model name."""
    opened = open_run(run)
    src.run_dir, src.base_4bit, src.quant_block_size = run, opened.base_4bit, opened.quant_block_size
    return opened.config.model.name


def _adapter_folder(path: Path) -> Path:
    """An adapter folder given directly or as a run directory holding ``adapter/``."""
    if (path / "adapter_config.json").is_file():
        return path
    if is_run_dir(path):
        opened = open_run(path)
        if opened.kind == "adapter":
            return opened.artefact
        raise LmforgeError(f"{path}: the run has no adapter/ folder (a full fine-tune keeps model/)")
    raise LmforgeError(f"{path}: not a run directory or a PEFT adapter folder (no adapter_config.json)")


def resolve_source(model: str, adapter: str | None = None, *, base_4bit: bool | None = None) -> Source:
    """Work out base model, adapter and 4-bit-ness from a model reference/run dir and ``--adapter``.

    Args:
        model: model reference, run directory, or adapter folder.
        adapter: optional adapter folder or run directory.
        base_4bit: force (True/False) loading the base as NF4; None reads it from the run config.
    """
    path = Path(model).expanduser() if model else None
    src = Source(base=model)
    if path is not None and adapter is None and (path / "adapter_config.json").is_file():
        adapter = model  # an adapter folder as the model argument
        src.base = ""
    elif path is not None and is_run_dir(path):
        if adapter is not None:
            raise LmforgeError(f"{path} is a run directory; give --adapter with a base model instead")
        name = _read_run(path, src)
        opened = open_run(path)
        if opened.kind == "model":
            src.base = str(opened.artefact)
        elif opened.kind == "adapter":
            src.base, src.adapter = name, opened.artefact
        else:
            raise LmforgeError(f"{path}: the run has neither adapter/ nor model/ (did training finish?)")
    if adapter is not None:
        src.adapter = _adapter_folder(Path(adapter).expanduser())
        run = src.adapter.parent if is_run_dir(src.adapter.parent) else None
        if run is not None:
            src.base = src.base or _read_run(run, src)
        if not src.base:
            from .adapters import read_adapter_config

            src.base = read_adapter_config(src.adapter).get("base_model_name_or_path") or ""
        if not src.base:
            raise LmforgeError(f"{src.adapter}: the base model is unknown; pass it explicitly")
    if base_4bit is not None:
        src.base_4bit = base_4bit
    return src


def _tokenizer_folder(src: Source, base_folder: Path) -> Path:
    for cand in (src.adapter, src.run_dir):
        if cand is not None and (cand / "tokenizer_config.json").is_file():
            return cand
    return base_folder


def load_causal_lm(src: Source, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                   trust_remote_code: bool | None = None, seq2seq_ok: bool = False, purpose: str | None = None):
    """Load base (+ NF4 quantisation when the run used a 4-bit base) + adapter, in eval mode.

    ``trust_remote_code`` None: the command's ``--trust-remote-code`` flag decides (off by default).
    ``seq2seq_ok``: the caller also takes encoder-decoder models (generate, merge, generation
    eval); otherwise one is refused in one line naming the model and ``purpose``.

    Returns:
        ``(model, tokenizer, folder)``: the model on ``device``, its tokenizer, the base folder.
    """
    from .models import check_architecture, load_tokenizer, resolve_model

    if trust_remote_code is None:
        from .config import remote_code_allowed

        trust_remote_code = remote_code_allowed(False)
    folder = resolve_model(src.base)
    check_architecture(folder, "generative" if seq2seq_ok else "causal", purpose)
    model = load_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    if src.base_4bit:
        from .quant.nf4 import quantize_model

        quantize_model(model, block_size=src.quant_block_size)
    if src.adapter is not None:
        from .adapters import load_adapter

        load_adapter(model, src.adapter)
    tokenizer = load_tokenizer(_tokenizer_folder(src, folder), trust_remote_code)
    return model.to(device).eval(), tokenizer, folder
