"""Load a causal LM with its LoRA adapter, and merge the adapter into a standalone HF folder.

A source is a model reference (anything :func:`lmforge.models.resolve_model` accepts), a run
directory (``config.yaml`` plus ``adapter/`` in PEFT format or ``model/`` as an HF folder) or an
adapter folder. A run trained on a 4-bit base (its typed config says ``mode: qlora``, read through
:func:`lmforge.rundir.open_run`) is loaded on the same NF4 base it was trained on.

Merging computes ``W' = W0 + (alpha / r) B A`` per adapted layer (LoRA, Hu et al. 2021, Sec. 4.1).
On a 4-bit base ``W0`` is first dequantised to fp32 (``W0 = dequant(NF4(W))``, the weight the
adapter was trained against): the update is never merged into 4-bit codes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LmforgeError
from .rundir import is_run_dir, open_run

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
                   trust_remote_code: bool | None = None):
    """Load base (+ NF4 quantisation when the run used a 4-bit base) + adapter, in eval mode.

    ``trust_remote_code`` None: the command's ``--trust-remote-code`` flag decides (off by default).

    Returns:
        ``(model, tokenizer, folder)``: the model on ``device``, its tokenizer, the base folder.
    """
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer, resolve_model

    if trust_remote_code is None:
        from .config import remote_code_allowed

        trust_remote_code = remote_code_allowed(False)
    folder = resolve_model(src.base)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise LmforgeError(f"{folder}: cannot load a causal LM ({str(err).splitlines()[0]})") from None
    if src.base_4bit:
        from .quant.nf4 import quantize_model

        quantize_model(model, block_size=src.quant_block_size)
    if src.adapter is not None:
        from .adapters import load_adapter

        load_adapter(model, src.adapter)
    tokenizer = load_tokenizer(_tokenizer_folder(src, folder), trust_remote_code)
    return model.to(device).eval(), tokenizer, folder


@torch.no_grad()
def _sample_logits(model, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Logits of the model on fixed random token ids: (2, 16, V) fp32."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, 16), generator=gen)  # (2, 16)
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def merge(source: str, out: str | Path, *, base: str | None = None, dtype: str = "fp32",
          base_4bit: bool | None = None, overwrite: bool = False) -> dict:
    """Merge a LoRA adapter into its base and write a standalone Hugging Face folder.

    Args:
        source: run directory or adapter folder.
        out: output folder (safetensors weights, config, tokenizer with its chat template).
        base: base model reference (default: the run config's model, else the adapter's
            ``base_model_name_or_path``).
        dtype: weights dtype of the merged model: fp32, bf16 or fp16.
        base_4bit: the adapter was trained on an NF4 base (None: read from the run config).
        overwrite: replace a non-empty ``out``.

    Returns:
        ``{"out", "dtype", "dequantized", "max_abs_diff"}``: ``max_abs_diff`` is
        ``max |logits_adapter - logits_merged|`` on sample inputs.
    """
    from .adapters import unwrap_lora
    from .quant.nf4 import dequantize_model
    from .rundir import atomic_dir, write_json

    if dtype not in DTYPES:
        raise LmforgeError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LmforgeError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    path = Path(source).expanduser()
    if is_run_dir(path) and open_run(path).kind == "model":
        raise LmforgeError(f"{path}: nothing to merge, {path / 'model'} is already a standalone model folder")
    src = resolve_source(base or "", str(path), base_4bit=base_4bit)
    model, tokenizer, _ = load_causal_lm(src, dtype=torch.float32)
    vocab = model.get_input_embeddings().num_embeddings
    reference = _sample_logits(model, vocab)  # adapter outputs (on the 4-bit base when there is one)
    dequantized = dequantize_model(model, torch.float32) if src.base_4bit else 0
    unwrap_lora(model)  # W0 + scale * B A into each base weight; wrappers removed
    model = model.to(DTYPES[dtype])
    diff = float((_sample_logits(model, vocab) - reference).abs().max())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "lmforge_merge.json",
                   {"base": src.base, "adapter": str(src.adapter), "base_4bit": src.base_4bit, "dtype": dtype})
    log.info("merged %s into %s (max |adapter - merged| = %.3g)", src.adapter, out, diff)
    return {"out": str(out), "dtype": dtype, "dequantized": dequantized, "max_abs_diff": diff}
