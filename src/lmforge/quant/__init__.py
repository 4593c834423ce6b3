"""Quantised base weights (QLoRA-style NF4): the format in ``nf4_codec``, the layers in ``nf4``."""
from lmforge.quant.nf4 import (
    NF4_CODE,
    Linear4bit,
    NF4Weight,
    dequantize_model,
    dequantize_nf4,
    nf4_weight_bytes,
    quantize_model,
    quantize_nf4,
)

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "Linear4bit",
    "quantize_model",
    "dequantize_model",
    "nf4_weight_bytes",
]
