"""A sentence encoder: a transformer backbone, mask-aware pooling, optional L2 normalisation.

``SentenceEncoder.encode`` is the fast path for inference: texts are tokenised once, sorted by
token length and cut into batches (so a batch pads to nearly its own length), run under
``torch.inference_mode`` with the precision ``lmforge.device.Placement`` picks (bf16 on CPUs with
AMX / AVX512-BF16: autocast over fp32 weights while training, or weights stored in bf16 after
``to_inference`` for pure inference), pooled in fp32 and written back in input order. Stock BERT
backbones (MiniLM ...) run there on :mod:`lmforge.fast_encode` (fused QKV, prepacked oneDNN
weights with fused GELU on CPU, packed rows, attention per sequence), the same function as
transformers' forward; ``encoder.fast_path = False`` keeps transformers' path. On CPU with torch
at n >= 2 threads the fast path's batches run on n worker threads at 1 intra-op thread each
(:func:`lmforge.device.run_batches`: the 1-thread vectors bit for bit, at the 1-thread CPU cost);
long texts are tokenised from a character prefix with the full text's ids
(:mod:`lmforge.embeddings.prefix_tokens`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batching import attention_mask, pad_sequences
from ..device import Placement, run_batches
from ..errors import LmforgeError
from ..unpad import enable_unpadding

_FAST: "weakref.WeakKeyDictionary" = None  # encoder -> (key, FastBert), see SentenceEncoder._fast_path

POOLING_MODES = ("mean", "cls", "max", "last")
AUTO_PROGRESS = 2000  # texts from which encode() reports progress unless told otherwise


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Pool token states into one vector per sequence, ignoring padding.

    With ``m_t`` the attention mask of token ``t`` and ``h_t`` its state:

    - ``mean``: ``e = sum_t m_t h_t / max(sum_t m_t, 1e-9)`` (SBERT's default);
    - ``cls``: ``e = h_0`` (first token, BERT's [CLS]);
    - ``max``: ``e_d = max_{t: m_t = 1} h_{t,d}``;
    - ``last``: ``e = h_T`` with ``T`` the last position where ``m_t = 1`` (decoders, right padding).

    Args:
        hidden: ``(B, T, D)`` token states (any float dtype; pooled in fp32 or wider).
        mask: ``(B, T)`` attention mask, 1 for real tokens.
        mode: one of ``mean``, ``cls``, ``max``, ``last``.

    Returns:
        ``(B, D)`` pooled vectors (fp32 for half-precision inputs).
    """
    h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))  # (B, T, D)
    m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    if mode == "mean":
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (B, D)
    if mode == "cls":
        return h[:, 0]  # (B, D)
    if mode == "max":
        return h.masked_fill(m == 0, -1e9).max(dim=1).values  # (B, D)
    if mode == "last":
        last = mask.long().sum(1).clamp_min(1) - 1  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last]  # (B, D)
    raise LmforgeError(f"pooling must be one of {', '.join(POOLING_MODES)}, got '{mode}'")


HIDDEN_DROPOUT_KEYS = ("hidden_dropout_prob", "dropout", "hidden_dropout", "resid_pdrop")
# residual-branch output projections of Llama-family blocks (attention out, MLP down)
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def set_dropout(config, p: float) -> None:
    """Set every dropout probability a transformers config knows about to ``p``."""
    for key in HIDDEN_DROPOUT_KEYS + ("attention_probs_dropout_prob", "attention_dropout", "embd_pdrop",
                                      "attn_pdrop"):
        if hasattr(config, key):
            setattr(config, key, p)


def has_hidden_dropout(config) -> bool:
    """Whether the architecture has a dropout on hidden states (BERT, GPT-2 ...), not only on
    attention probabilities (Llama, Mistral, Qwen, Gemma configs have ``attention_dropout`` only)."""
    return any(hasattr(config, k) for k in HIDDEN_DROPOUT_KEYS)


def add_residual_dropout(backbone: nn.Module, p: float) -> int:
    """Dropout where BERT has it, for decoders whose configs lack it: on the token embeddings and
    on each residual branch's output (``o_proj``, ``down_proj``), active only in training mode.

    Unsupervised SimCSE needs two differently-noised views of a sentence; attention-probability
    dropout alone barely perturbs a decoder's states. Forward hooks draw from torch's RNG, so
    GradCache's RNG replay reproduces the masks. Returns the number of hooked modules.
    """
    def hook(module: nn.Module, args, output):
        return F.dropout(output, p, module.training) if isinstance(output, Tensor) else output

    mods = [backbone.get_input_embeddings()]
    mods += [m for name, m in backbone.named_modules() if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS]
    for m in mods:
        m.register_forward_hook(hook)
    return len(mods)


class SentenceEncoder(nn.Module):
    """Backbone + pooling (+ normalisation): ``forward`` maps token batches to ``(B, D)`` vectors.

    Args:
        backbone: a transformers base model (``AutoModel``) returning ``last_hidden_state``.
        tokenizer: its tokenizer (must have a pad token).
        pooling: ``mean``, ``cls``, ``max`` or ``last``.
        normalize: L2-normalise the output vectors.
        max_length: truncation length in tokens (sentence-transformers' ``max_seq_length``).
        unpad: run encoder (non-causal) backbones on unpadded batches (:mod:`lmforge.unpad`; same
            vectors, no compute on padding); decoders are left as they are.
    """

    def __init__(self, backbone: nn.Module, tokenizer, *, pooling: str = "mean", normalize: bool = False,
                 max_length: int = 256, unpad: bool = True):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise LmforgeError(f"pooling must be one of {', '.join(POOLING_MODES)}, got '{pooling}'")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = int(max_length)
        if getattr(backbone.config, "use_cache", None):
            backbone.config.use_cache = False  # decoders: no KV cache while embedding
        if unpad:
            enable_unpadding(backbone)
        self.fast_path = True  # encode() on lmforge.fast_encode where it applies (False: transformers' path)

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, ref: str | Path, *, pooling: str | None = None, normalize: bool | None = None,
                        max_length: int | None = None, dropout: float | None = None,
                        residual_dropout: float | None = None, attn_implementation: str | None = None,
                        trust_remote_code: bool = False,
                        revision: str | None = None, unpad: bool = True) -> "SentenceEncoder":
        """Load a sentence-transformers folder or a plain Hugging Face model (alias, folder, hub id).

        Settings stored in a sentence-transformers folder (pooling, normalisation, max length) are
        used unless overridden; plain models default to mean pooling without normalisation.
        ``dropout`` sets every dropout of the config (Llama-family configs have attention dropout
        only); ``residual_dropout`` adds one on their embeddings and residual branches
        (:func:`add_residual_dropout`).
        ``attn_implementation``: transformers' attention kernel (default: transformers' choice).
        ``unpad``: unpadded batches for encoder backbones (:mod:`lmforge.unpad`).
        """
        from transformers import AutoConfig, AutoModel

        from ..models import load_tokenizer, resolve_model
        from .st_io import read_st_settings

        folder = resolve_model(str(ref), revision)
        st = read_st_settings(folder)
        hf_dir = folder / st.transformer_path
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
        if dropout is not None:
            set_dropout(config, dropout)
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        backbone = AutoModel.from_pretrained(hf_dir, config=config, trust_remote_code=trust_remote_code,
                                             dtype=torch.float32, **kw)
        if residual_dropout:
            if has_hidden_dropout(config):
                raise LmforgeError(f"{ref}: the model has its own hidden dropout; set it with 'dropout'")
            add_residual_dropout(backbone, residual_dropout)
        tokenizer = load_tokenizer(hf_dir, trust_remote_code)
        length = max_length or st.max_seq_length or _tokenizer_limit(tokenizer, config)
        return cls(backbone, tokenizer, pooling=pooling or st.pooling or "mean",
                   normalize=st.normalize if normalize is None else normalize, max_length=length, unpad=unpad)

    def save(self, out_dir: str | Path) -> Path:
        """Write a sentence-transformers folder (see :func:`lmforge.embeddings.st_io.save_st_folder`)."""
        from .st_io import save_st_folder

        return save_st_folder(self, out_dir)

    # ---- tokens -> vectors ------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (special tokens added, truncated to ``max_length``), unpadded."""
        from .prefix_tokens import truncated_ids

        return truncated_ids(self.tokenizer, texts, self.max_length)  # long texts from an exact prefix

    def tokenize_ahead(self, texts: Sequence[str]) -> None:
        """Start :meth:`tokenize` of ``texts`` on a background thread; the next :meth:`encode` of
        this same sequence object takes its ids from there (an error there is raised there). The
        tokenizer runs in Rust without the GIL, so the caller's own Python work (reading data,
        building a vocabulary) runs meanwhile instead of before or after it."""
        box: dict = {}

        def work() -> None:
            try:
                box["ids"] = self.tokenize(texts)
            except BaseException as exc:  # noqa: BLE001 - re-raised by encode()
                box["error"] = exc

        thread = threading.Thread(target=work, name="lmforge-tokenize", daemon=True)
        self._ahead = (texts, thread, box)
        thread.start()

    def _tokens_of(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of :meth:`tokenize_ahead` when it was started for this very object, else tokenised now."""
        ahead, self._ahead = getattr(self, "_ahead", None), None
        if ahead is None or ahead[0] is not texts:
            return self.tokenize(texts)
        ahead[1].join()
        if "error" in ahead[2]:
            raise ahead[2]["error"]
        return ahead[2]["ids"]

    def collate(self, ids: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Right-pad token id lists: ``input_ids`` and ``attention_mask``, both ``(B, T)``."""
        return {"input_ids": pad_sequences(ids, self.tokenizer.pad_token_id),
                "attention_mask": attention_mask(ids)}

    def pooled(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """``(B, T)`` token batch -> ``(B, D)`` pooled vectors (fp32), never normalised."""
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state  # (B, T, D)
        return pool(hidden, attention_mask, self.pooling)  # (B, D)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """``(B, T)`` token batch -> ``(B, D)`` sentence vectors (fp32), normalised if the encoder is."""
        emb = self.pooled(input_ids, attention_mask, token_type_ids)  # (B, D)
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb

    def to_inference(self, placement: Placement) -> "SentenceEncoder":
        """Prepare for inference only: move to the placement's device and, when it computes in
        bf16/fp16, store the weights in that dtype (no per-op casts; pooling stays fp32).
        Do not train the encoder afterwards."""
        self.eval().requires_grad_(False)
        self.to(placement.device)
        if placement.autocast_enabled:
            self.backbone.to(placement.dtype)
        return self

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, placement: Placement | None = None,
               device: str = "auto", precision: str = "auto", normalize: bool | None = None,
               progress: bool | None = None) -> np.ndarray:
        """Embed ``texts`` in length-sorted batches; returns ``(N, D)`` float32 in input order.

        Args:
            texts: sentences (any order; output rows follow it).
            batch_size: sentences per forward pass.
            placement: where/how to compute; default ``Placement.resolve(device, precision)``
                (bf16 autocast on CPUs with native bf16, fp32 otherwise).
            normalize: override the encoder's L2 normalisation.
            progress: show progress with an estimate (sentences); None: for corpora of
                ``AUTO_PROGRESS`` texts or more (building an index, topics ...).
        """
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise LmforgeError(f"batch size must be a positive integer, got {batch_size!r:.20}")
        place = placement or Placement.resolve(device, precision)
        unit = self.normalize if normalize is None else normalize
        ids = self._tokens_of(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(ids), self.dim, dtype=torch.float32)  # (N, D)
        bar = _bar(len(ids), len(ids) >= AUTO_PROGRESS if progress is None else progress)
        was_training = self.training
        self.eval()
        first = next(self.parameters())
        if first.device != place.device:
            self.to(place.device)
        fast = self._fast_path(place)
        if place.int8 and not getattr(fast, "int8", False):
            _warn_no_int8(type(self.backbone).__name__)
        # weights already in low precision (to_inference): run the ops natively, no autocast
        autocast = first.dtype == torch.float32 and fast is None
        lock = threading.Lock()

        def context():  # per worker thread: inference mode and autocast are thread-local
            stack = contextlib.ExitStack()
            stack.enter_context(torch.inference_mode())
            stack.enter_context(place.autocast() if autocast else contextlib.nullcontext())
            return stack

        def one(idx: list[int]) -> None:
            batch = {k: v.to(place.device) for k, v in self.collate([ids[i] for i in idx]).items()}
            if fast is not None and self.pooling == "mean":
                emb = fast.mean_pooled(batch["input_ids"], batch["attention_mask"])  # (b, D) fp32
            elif fast is not None:
                hidden = fast.hidden(batch["input_ids"], batch["attention_mask"])  # (b, T, D)
                emb = pool(hidden, batch["attention_mask"], self.pooling)  # (b, D) fp32
            else:
                emb = self.pooled(batch["input_ids"], batch["attention_mask"])  # (b, D) fp32
            if unit:
                emb = F.normalize(emb, p=2, dim=-1)
            out[torch.as_tensor(idx)] = emb.float().cpu()
            with lock:
                bar.update(len(idx))

        try:
            # the fast path (a pure function of the batch) on CPU with n >= 2 torch threads: n worker
            # threads at 1 intra-op thread each, the same vectors as a 1-thread run bit for bit
            # (lmforge.device.run_batches); transformers' path (hooks may record state) in order
            run_batches(one, [order[s:s + batch_size] for s in range(0, len(order), batch_size)], place.device,
                        context, parallel=fast is not None)
        finally:
            bar.close()
            self.train(was_training)
        return out.numpy()


    def code_path(self, place: Placement) -> str:
        """Which computation ``encode`` runs on ``place``, for caches of its vectors (two paths
        agree to ~1e-5, not bit for bit): ``fast_encode-<VERSION>`` with ``1-thread`` kernels (CPU
        worker threads or torch at 1 thread) or ``<n>-threads``, else ``transformers-<attention>``."""
        from .. import fast_encode
        from ..device import inference_workers

        if self._fast_path(place) is None:
            return f"transformers-{getattr(self.backbone.config, '_attn_implementation', None)}"
        n = torch.get_num_threads() if place.device.type == "cpu" else 0
        kernels = "1-thread" if n == 1 or inference_workers(place.device, 2) > 1 else f"{n}-threads"
        return f"fast_encode-{fast_encode.VERSION}-{place.device.type}-{kernels}" + ("-int8" if place.int8 else "")

    def train(self, mode: bool = True):
        """Switching to training drops the inference fast path's copy of the weights: optimizer
        steps follow, and fused AdamW's in-place updates leave no trace in the version counters
        the cache key reads (a stale copy would score the first evaluation's weights forever)."""
        if mode and _FAST is not None:
            _FAST.pop(self, None)
        return super().train(mode)

    def _fast_path(self, place: Placement):
        """The :class:`lmforge.fast_encode.FastBert` of this encoder's current weights in the
        placement's compute dtype (built once, rebuilt when a weight changed: training steps
        between evaluations), or None where it does not apply (``fast_path`` off, not a stock
        BERT backbone, see :func:`lmforge.fast_encode.supported`)."""
        from .. import fast_encode

        global _FAST
        if not getattr(self, "fast_path", True) or not fast_encode.supported(self.backbone):
            return None
        params = list(self.backbone.parameters())
        dtype = params[0].dtype if params[0].dtype != torch.float32 else place.dtype
        int8 = place.int8 and dtype == torch.float32
        key = (dtype, int8, str(place.device), tuple((p.data_ptr(), _version(p)) for p in params))
        if _FAST is None:
            _FAST = weakref.WeakKeyDictionary()
        hit = _FAST.get(self)
        if hit is None or hit[0] != key:
            _FAST[self] = hit = (key, fast_encode.FastBert(self.backbone, dtype, int8=int8))
        return hit[1]


@functools.lru_cache(maxsize=None)
def _warn_no_int8(backbone: str) -> None:
    logging.getLogger("lmforge").warning(
        "precision int8 runs on the fast path of stock BERT-family encoders with fp32 weights; this %s "
        "encoder computes in fp32", backbone)


def _version(p: Tensor) -> int:
    """In-place update counter of a parameter (inference tensors, made under ``inference_mode``,
    have none and cannot be updated in place outside it: -1). Not enough alone: the fused and
    foreach AdamW kernels update in place without bumping it, hence ``SentenceEncoder.train``."""
    return -1 if p.is_inference() else p._version


def _tokenizer_limit(tokenizer, config) -> int:
    limit = getattr(tokenizer, "model_max_length", None) or 512
    pos = getattr(config, "max_position_embeddings", None) or limit
    return int(min(limit, pos, 512))


def _bar(total: int, enabled: bool):
    from ..progress import progress

    return progress(total, 0, enabled, desc="encode", interval=10)
