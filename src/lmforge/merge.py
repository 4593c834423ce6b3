"""Merge an adapter into its base and write a standalone Hugging Face folder.

The source (run directory or adapter folder, a 4-bit base when the run's typed config says
``mode: qlora``) is loaded by :mod:`lmforge.causal_lm`, the package's one causal-LM loader.

Merging computes ``W' = W0 + (alpha / r) B A`` per adapted layer (LoRA, Hu et al. 2021, Sec. 4.1).
On a 4-bit base ``W0`` is first dequantised to fp32 (``W0 = dequant(NF4(W))``, the weight the
adapter was trained against): the update is never merged into 4-bit codes.

Encoder-decoder adapters (T5, BART: PEFT ``SEQ_2_SEQ_LM``) merge the same way into every adapted
encoder and decoder projection; the written folder is a plain ``AutoModelForSeq2SeqLM`` folder.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .causal_lm import Source, load_causal_lm, resolve_source  # noqa: F401  (loading lives in causal_lm)
from .errors import LmforgeError
from .rundir import is_run_dir, open_run

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def _sample_logits(model, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Logits of the model on fixed random token ids: (2, 16, V) fp32 (seq2seq: 16 source tokens
    and 8 decoder tokens, (2, 8, V))."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, 16), generator=gen)  # (2, 16)
    device = next(model.parameters()).device
    extra = {}
    if getattr(model.config, "is_encoder_decoder", False):
        extra["decoder_input_ids"] = torch.randint(0, vocab_size, (2, 8), generator=gen).to(device)  # (2, 8)
    return model(input_ids=ids.to(device), **extra).logits.float().cpu()


def merge(source: str, out: str | Path, *, base: str | None = None, dtype: str = "fp32",
          base_4bit: bool | None = None, overwrite: bool = False) -> dict:
    """Merge a LoRA adapter into its base (causal or seq2seq) and write a standalone Hugging Face folder.

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
    model, tokenizer, _ = load_causal_lm(src, dtype=torch.float32, seq2seq_ok=True)
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


def interpolate_weights(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """Weight-space ensemble of a fine-tuned model with its start (WiSE-FT, Wortsman et al. 2022, Eq. 1):
    ``theta = (1 - alpha) * theta_base + alpha * theta_tuned`` per tensor, computed in fp32 and
    returned in the tuned tensor's dtype (and shape). ``alpha = 1`` is the fine-tuned model,
    ``alpha = 0`` the start. Integer tensors (position ids, buffers) are taken from ``tuned``.
    Both state dicts must have the same keys and shapes (names the first that differs).
    """
    if not 0.0 <= alpha <= 1.0:
        raise LmforgeError(f"interpolation alpha must lie in [0, 1], got {alpha}")
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise LmforgeError(f"interpolation: the two models differ in tensor '{missing[0]}' ({len(missing)} names)")
    out = {}
    for k, t in tuned.items():
        b = base[k]
        if b.shape != t.shape:
            raise LmforgeError(f"interpolation: '{k}' has shape {tuple(b.shape)} vs {tuple(t.shape)}")
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        out[k] = ((1.0 - alpha) * b.float().to(t.device) + alpha * t.float()).to(t.dtype)
    return out


AVERAGED = "averaged.json"
# Task extras carried into an averaged run: they describe the task, not one member's weights, and
# must be the same file in every member (``decision.json``, fitted to one set of weights, is not).
_SHARED_EXTRAS = ("labels.json",)


def _checkpoints(checkpoint: str | list[str]) -> list[str]:
    names = [c.strip() for c in checkpoint.split(",")] if isinstance(checkpoint, str) else list(checkpoint)
    for c in names:
        if c not in ("final", "best") and not (c.startswith("step-") and c[5:].isdigit()):
            raise LmforgeError(f"checkpoint '{c}': averaging takes final, best or step-N (comma-separated)")
    if len(set(names)) != len(names) or not names:
        raise LmforgeError(f"checkpoint '{','.join(names)}': name each checkpoint once")
    return names


def _read_member(opened, finals: dict | None = None) -> tuple[dict, dict]:
    """``(adapter_config, tensors)`` of one run's chosen weights (a step checkpoint as its adapter names
    them); ``finals`` caches each run's final adapter, read once for all its checkpoints."""
    from .adapters.average import checkpoint_as_adapter, read_lora_folder

    if opened.kind != "checkpoint":
        return read_lora_folder(opened.require("adapter"))
    finals = {} if finals is None else finals
    if opened.run_dir not in finals:
        finals[opened.run_dir] = read_lora_folder(open_run(opened.run_dir, "final").require("adapter"))
    config, reference = finals[opened.run_dir]
    return config, checkpoint_as_adapter(opened.step_weights(), reference, str(opened.root / "trainable.safetensors"))


def average(sources: list[str], out: str | Path, *, checkpoint: str | list[str] = "final",
            weights: list[float] | None = None, overwrite: bool = False) -> dict:
    """Average LoRA runs (or adapter folders) trained alike into one (a weight-averaged model, WARM).

    Each layer's update becomes the weighted mean of the members' updates, written exactly as one
    LoRA of rank ``n r`` (:mod:`lmforge.adapters.average`); task heads are averaged element-wise.
    The members are every (run, checkpoint) pair: several runs at ``best`` (a soup of seeds, WARM),
    one run at several checkpoints (``step-100,step-150,final``: trajectory averaging, SWA), or both.

    Args:
        sources: one or more run directories of one task and base, or two or more adapter folders.
        out: the new run directory (members are runs: ``config.yaml`` of the first member with
            this name, ``adapter/``, shared task extras, ``averaged.json``), else an adapter folder.
        checkpoint: which weights of each run: ``final``, ``best``, ``step-N``, or several of them
            (a list or comma-separated).
        weights: member weights in (run, checkpoint) order (normalised; default equal).
        overwrite: replace ``out`` when it is an earlier averaged run or adapter folder.

    Returns:
        ``{"out", "members", "weights", "r", "lora_alpha"}``.
    """
    from .adapters.average import average_lora, member_weights, read_lora_folder
    from .adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME
    from .rundir import atomic_dir, write_json, write_safetensors
    from .rundir.layout import CONFIG

    checkpoints = _checkpoints(checkpoint)
    paths = [Path(s).expanduser() for s in sources]
    if not paths:
        raise LmforgeError("average: give run directories or adapter folders")
    runs = [is_run_dir(p) for p in paths]
    if any(runs) and not all(runs):
        odd = paths[runs.index(False)]
        raise LmforgeError(f"{odd}: not a run directory; average runs with runs, adapter folders with folders")
    if not all(runs) and checkpoints != ["final"]:
        raise LmforgeError(f"--checkpoint {','.join(checkpoints)}: adapter folders have one set of weights; "
                           f"checkpoints are chosen in run directories")
    if len(paths) * len(checkpoints) < 2:
        raise LmforgeError("average: give two or more runs, adapter folders or checkpoints of a run")
    opened = [open_run(p, c) for p in paths for c in checkpoints] if all(runs) else []
    names = [f"{o.run_dir}@{o.checkpoint}" for o in opened] if opened else [str(p) for p in paths]
    for o in opened[1:]:
        first = opened[0].config
        for what, a, b in (("task", first.task, o.config.task), ("model.name", first.model.name, o.config.model.name)):
            if a != b:
                raise LmforgeError(f"{o.run_dir}: {what} is {b!r}, {opened[0].run_dir} has {a!r}")
    extras = {}
    for name in _SHARED_EXTRAS:  # a step checkpoint's extras are its run's
        files = [(o.run_dir if o.kind == "checkpoint" else o.root) / name for o in opened]
        if any(f.is_file() for f in files):
            texts = [f.read_bytes() if f.is_file() else None for f in files]
            odd = next((f for f, t in zip(files, texts) if t != texts[0]), None)
            if odd is not None:
                raise LmforgeError(f"{odd}: differs from {files[0]}; members must share it")
            extras[name] = texts[0]
    finals: dict = {}
    members = [_read_member(o, finals) for o in opened] if opened else [read_lora_folder(p) for p in paths]
    config, tensors = average_lora([m[0] for m in members], [m[1] for m in members], weights, names=names)
    w = member_weights(weights, len(members))

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        ours = (out / AVERAGED).is_file() or (out / CONFIG_NAME).is_file()
        if not overwrite:
            raise LmforgeError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
        if not ours:
            raise LmforgeError(f"{out}: not an averaged run or adapter folder; will not replace it")
    provenance = {"method": "weight average of LoRA updates (WARM / model soup / SWA)",
                  "checkpoint": ",".join(checkpoints), "members": names, "weights": w, "r": config["r"],
                  "lora_alpha": config["lora_alpha"]}
    with atomic_dir(out) as tmp:
        adapter = tmp / "adapter" if opened else tmp
        adapter.mkdir(exist_ok=True)
        write_safetensors(adapter / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json(adapter / CONFIG_NAME, config)
        if opened:
            from .config import dump_config

            cfg = opened[0].config.model_copy(deep=True)
            cfg.name, cfg.output_dir = out.name, str(out.parent)
            if getattr(cfg, "adapter", None) is not None and hasattr(cfg.adapter, "r"):
                cfg.adapter.r, cfg.adapter.alpha = int(config["r"]), float(config["lora_alpha"])
            for name, data in extras.items():
                (tmp / name).write_bytes(data)
            write_json(tmp / AVERAGED, provenance)
            (tmp / CONFIG).write_text(dump_config(cfg), encoding="utf-8")
    log.info("averaged %d adapters into %s (rank %d)", len(members), out, config["r"])
    return {"out": str(out), "members": provenance["members"], "weights": w, "r": config["r"],
            "lora_alpha": config["lora_alpha"]}
