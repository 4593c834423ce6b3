"""Parameter-efficient adapters: LoRA wrapped in place, peft-format I/O."""
from lmforge.adapters.lora import (
    LoraLinear,
    LoraSpec,
    ModulesToSave,
    apply_lora,
    disable_lora,
    format_trainable,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
    unmerge_lora,
    unwrap_lora,
)
from lmforge.adapters.peft_io import load_adapter, read_adapter_config, save_adapter

__all__ = [
    "LoraLinear",
    "LoraSpec",
    "ModulesToSave",
    "apply_lora",
    "disable_lora",
    "format_trainable",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
    "trainable_parameters",
    "unmerge_lora",
    "unwrap_lora",
]
