"""``inspect``'s library side: load any model lmforge loads, run the chosen views, build the page."""
from __future__ import annotations

import html
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import LmforgeError
from . import lens as L
from .render import HTML_BG, img_tag, page, table

log = logging.getLogger("lmforge")

VIEWS = ("next", "lens", "attention", "kv", "mask")


def load(ref: str, adapter: str | None = None, device: str = "auto"):
    """``(model, tokenizer, kind)`` in fp32 eval mode; ``kind`` is ``"causal"`` or ``"encoder"``.

    Causal LMs (and training runs / LoRA adapters of them) load through :func:`lmforge.causal_lm.load_causal_lm`;
    other models as a masked LM when their checkpoint has that class (else the bare encoder).
    """
    from transformers import AutoConfig

    from ..device import pick_device
    from ..causal_lm import load_causal_lm, resolve_source
    from ..models import is_decoder_only, resolve_model

    dev = pick_device(device)
    src = resolve_source(ref, adapter)
    folder = resolve_model(src.base) if src.base else None
    if folder is not None and src.adapter is None:
        cfg = AutoConfig.from_pretrained(str(folder))
        if getattr(cfg, "is_encoder_decoder", False):
            raise LmforgeError(f"{ref} is an encoder-decoder model ({type(cfg).__name__}): inspect reads decoder-only "
                               "and encoder models; `lmforge tokenize` works for its tokenizer")
        if not is_decoder_only(cfg):
            return _load_encoder(folder, ref, dev) + ("encoder",)
    model, tokenizer, _ = load_causal_lm(src, device=dev)
    return model, tokenizer, "causal"


def _load_encoder(folder: Path, name: str, dev):
    from transformers import AutoModel, AutoModelForMaskedLM

    from ..models import load_tokenizer

    tokenizer = load_tokenizer(folder)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
        if any(k.startswith(("cls.", "lm_head", "vocab_", "predictions")) or ".decoder" in k for k in info["missing_keys"]):
            log.warning("%s has no trained masked-LM head: its [MASK] fills are random (attention and tokenization "
                        "are still the model's own)", name)
    except ValueError:
        model = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
    return model.to(dev).eval(), tokenizer


def choose_views(kind: str, prompt: str, views: list[str] | None, model_name: str) -> list[str]:
    """The views to run; asking an encoder for the next-token views is a one-line error saying what works."""
    if views:
        bad = [v for v in views if v not in VIEWS]
        if bad:
            raise LmforgeError(f"--views: unknown view {bad[0]!r} (choose from {', '.join(VIEWS)})")
    if kind == "causal":
        chosen = views or ["next", "lens", "attention", "kv"]
        if "mask" in chosen:
            raise LmforgeError(f"{model_name} is a causal LM: the 'mask' view needs a masked-LM encoder such as minilm")
        return chosen
    wanted = views or (["mask", "attention"] if L.MASK in prompt else ["next"])
    causal_only = [v for v in wanted if v in ("next", "lens", "kv")]
    if causal_only:
        raise LmforgeError(
            f"{model_name} is an encoder without a next-token LM head, so the {causal_only[0]!r} view needs a causal LM "
            f"(smollm2, a Llama/Gemma/GPT-2 folder); what works here: put {L.MASK} in the text for per-layer fills, "
            f"or --views attention")
    return wanted


def inspect_model(model, tokenizer, kind: str, prompt: str, *, views: list[str], top_k: int = 5,
                  temperature: float = 1.0, steps: int = 5, layer: int = -1, head: int = 0, kv_tokens: int = 16,
                  chat: bool = False) -> dict:
    """Run ``views`` on ``prompt``; returns a JSON-able dict (the attention matrix as nested lists)."""
    if not prompt or not prompt.strip():
        raise LmforgeError("the prompt is empty: give some text to inspect")
    if top_k <= 0:
        raise LmforgeError("--top-k must be positive")
    if steps < 0 or kv_tokens < 0:
        raise LmforgeError("--steps and --kv-tokens must be >= 0")
    L.next_token_probs(torch.zeros(1), temperature)  # validates the temperature
    device = next(model.parameters()).device
    out: dict = {"kind": kind, "prompt": prompt, "views": views}
    if kind == "causal":
        text = prompt
        if chat:
            from ..generation import render_chat

            text = render_chat(tokenizer, [{"role": "user", "content": prompt}])
        ids = torch.tensor([tokenizer(text, add_special_tokens=not chat)["input_ids"]], device=device)  # (1, T)
    else:
        ids = tokenizer(prompt.replace(L.MASK, tokenizer.mask_token or L.MASK), return_tensors="pt",
                        truncation=True)["input_ids"].to(device)
    if ids.shape[1] == 0:
        raise LmforgeError("the prompt encodes to no tokens")
    out["tokens"] = [tokenizer.decode([t]) for t in ids[0].tolist()]
    n_layers = len(L.block_stack(model))
    n_heads = getattr(model.config, "num_attention_heads", None) or 1
    if "attention" in views:
        layer, head = L.check_layer_head(n_layers, n_heads, layer, head)
    with torch.no_grad():
        if "next" in views:
            z = model(input_ids=ids, use_cache=False).logits[0, -1].float()  # (V,)
            out["next"] = {"top": L.top_tokens(L.next_token_probs(z), top_k, tokenizer),
                           "temperature": temperature,
                           "top_t": L.top_tokens(L.next_token_probs(z, temperature), top_k, tokenizer)}
            out["steps"] = [asdict(s) for s in L.greedy_steps(model, tokenizer, ids, steps, top_k, temperature)]
        if "lens" in views:
            lens = L.logit_lens(model, tokenizer, ids, k=top_k)
            out["lens"] = asdict(lens)
            if lens.max_diff > 1e-3:
                log.warning("logit lens: the last layer differs from the model's output by %.3g: this architecture "
                            "applies more than a final norm and the LM head", lens.max_diff)
        if "mask" in views:
            where, fills = L.mask_fills_per_layer(model, tokenizer, prompt, k=top_k)
            out["mask"] = {"positions": where, "fills": fills}
        if "attention" in views:
            weights = L.attention(model, ids, layer, head)
            out["attention"] = {"layer": layer, "head": head, "layers": n_layers, "heads": n_heads,
                                "weights": weights.cpu().tolist()}
    if "kv" in views and kv_tokens > 0:
        out["kv"] = L.kv_timing(model, ids, kv_tokens).summary()
    return out


def inspect_page(result: dict, png: bytes | None) -> str:
    """The HTML page of an :func:`inspect_model` result."""
    esc = html.escape
    spans = "".join(f'<span class="tok" style="background:{HTML_BG[i % len(HTML_BG)]}" title="#{i}">{esc(t)}</span>'
                    for i, t in enumerate(result["tokens"]))
    parts = [f"<p>{result['kind']} model &middot; {len(result['tokens'])} prompt tokens:</p>"
             f'<div class="spans">{spans}</div>']
    if "next" in result:
        nxt = result["next"]
        rows = [{"token": repr(a["token"]), "p (T=1)": a["prob"], f"token at T={nxt['temperature']}": repr(b["token"]),
                 f"p (T={nxt['temperature']})": b["prob"]} for a, b in zip(nxt["top"], nxt["top_t"])]
        parts.append("<h2>Next token</h2>" + table(rows))
        srows = [{"step": i + 1, "chosen": repr(s["chosen"]["token"]), "p": s["chosen"]["prob"],
                  "entropy (nats)": s["entropy"], "top-k": ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in s["top"]),
                  "text so far": s["text"]} for i, s in enumerate(result.get("steps", []))]
        parts.append("<h2>Greedy continuation, step by step</h2>" + table(srows))
    if "lens" in result:
        lens = result["lens"]
        head = ["layer"] + [f"{i}: {t!r}"[:24] for i, t in enumerate(lens["tokens"])]
        rows = []
        for li, per_pos in enumerate(lens["top"]):
            row = {"layer": "emb" if li == 0 else li}
            for i, tops in enumerate(per_pos):
                row[head[i + 1]] = f"{tops[0]['token']!r} {tops[0]['prob']:.2f}"
            rows.append(row)
        parts.append("<h2>Logit lens</h2><p>Each cell: the top next-token guess read from that layer's residual "
                     "stream through the final norm and LM head (last row = the model's output; max |difference| "
                     f"{lens['max_diff']:.2g}).</p>" + table(rows, head))
    if "mask" in result:
        m = result["mask"]
        rows = [{"layer": "emb" if li == 0 else li,
                 **{f"mask {j + 1}": ", ".join(f"{f['token']} {f['prob']:.2f}" for f in fills[j][:3])
                    for j in range(len(m["positions"]))}} for li, fills in enumerate(m["fills"])]
        parts.append("<h2>[MASK] fills per layer</h2>" + table(rows))
    if "attention" in result:
        a = result["attention"]
        parts.append(f"<h2>Attention, layer {a['layer']} head {a['head']} (of {a['layers']} x {a['heads']})</h2>")
        if png:
            parts.append(img_tag(png, "attention heatmap"))
    if "kv" in result:
        parts.append("<h2>KV cache: time per generated token</h2>" + table([result["kv"]]))
    return page("lmforge inspect", "".join(parts))
