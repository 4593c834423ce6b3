"""``lmforge fill-mask RUN_DIR_OR_MODEL "What a horrible [MASK]!"``: top-k fills of each mask."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import LmforgeError

log = logging.getLogger("lmforge")
PLACEHOLDER = "[MASK]"


def _model_folder(ref: str) -> Path:
    """An mlm run directory's ``model/``, else any model reference (folder, alias, hub id)."""
    from ..models import resolve_model

    from ..rundir import is_run_dir, open_run

    p = Path(ref)
    if is_run_dir(p):
        opened = open_run(p)
        if opened.kind == "model":
            return opened.artefact
        raise LmforgeError(f"{p}: this run has no model/ folder (fill-mask needs a masked-LM run or model)")
    return resolve_model(ref)


def fill_mask(model, tokenizer, text: str, top_k: int, placement) -> list[list[dict]]:
    """For each mask in ``text``, the ``top_k`` most likely tokens: ``[{"token", "score", "sequence"}]``.

    ``[MASK]`` is accepted as well as the tokenizer's own mask token (``<mask>`` ...).
    """
    import torch

    mask = tokenizer.mask_token
    if mask is None:
        raise LmforgeError("the model's tokenizer has no mask token")
    text = text.replace(PLACEHOLDER, mask)
    enc = tokenizer(text, return_tensors="pt", truncation=True)
    ids = enc["input_ids"][0]
    where = (ids == tokenizer.mask_token_id).nonzero(as_tuple=True)[0].tolist()
    if not where:
        raise LmforgeError(f"no mask in the text: write {PLACEHOLDER} (or {mask}) where a word is missing")
    with torch.no_grad(), placement.autocast():
        logits = model(**{k: v.to(placement.device) for k, v in enc.items()}).logits[0].float()  # (T, V)
    out = []
    for pos in where:
        probs = torch.softmax(logits[pos], -1)  # (V,)
        top = probs.topk(min(top_k, probs.numel()))
        fills = []
        for score, tid in zip(top.values.tolist(), top.indices.tolist()):
            filled = ids.clone()
            filled[pos] = tid
            fills.append({"token": tokenizer.decode([tid]).strip(), "score": score,
                          "sequence": tokenizer.decode(filled, skip_special_tokens=True)})
        out.append(fills)
    return out


def cmd_fill_mask(args) -> int:
    import torch
    from transformers import AutoModelForMaskedLM

    from ..device import Placement
    from ..models import load_tokenizer

    if args.top_k <= 0:
        raise LmforgeError("--top-k must be positive")
    placement = Placement.resolve(args.device, args.precision)
    folder = _model_folder(args.model)
    from ..models import check_architecture

    check_architecture(folder, "masked")
    tokenizer = load_tokenizer(folder)
    model, info = AutoModelForMaskedLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    if any(".decoder" in k or "predictions" in k or "lm_head" in k for k in info["missing_keys"]):
        log.warning("%s has no trained masked-LM head: the fills are random (train one with task: mlm)", args.model)
    model.to(placement.device).eval()
    results = fill_mask(model, tokenizer, args.text, args.top_k, placement)
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], ensure_ascii=False))
        return 0
    for n, fills in enumerate(results, start=1):
        if len(results) > 1:
            print(f"mask {n}:")
        for f in fills:
            print(f"{f['score']:.4f}\t{f['token']}\t{f['sequence']}")
    return 0


def register(sub) -> None:
    from .helptext import input_help

    p = sub.add_parser("fill-mask", help="top-k fills of [MASK] with a masked-LM run or model")
    p.add_argument("model", help="mlm run directory, model folder or packaged alias (minilm)")
    p.add_argument("text", help='text with [MASK] (or the tokenizer\'s own mask token), e.g. "What a horrible [MASK]!"')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the fills as JSON")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    input_help(p, "a masked LM (mlm run, folder, alias) and a text holding the mask token",
                  'lmforge fill-mask minilm "What a horrible [MASK]!"')
    p.set_defaults(func=cmd_fill_mask)
