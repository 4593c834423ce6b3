"""Parameter-efficient adapters wrapped in place behind one protocol, peft-format I/O.

Kinds: ``lora``, ``dora``, ``ia3``, ``prompt``, ``bottleneck``. A new kind is one module ending
with ``register_adapter(...)`` and one import line below.
"""
from lmforge.adapters import bottleneck, dora, ia3, lora, prompt  # noqa: F401  (each registers its kind)
from lmforge.adapters.base import (AdapterLayer, ModelAdapter, ModulesToSave, adapter_modules,
                                   adapter_state_dict, disable_adapters, format_trainable, merge_adapters,
                                   trainable_parameters, unmerge_adapters, unwrap_adapters)
from lmforge.adapters.bottleneck import BottleneckAdapter, BottleneckSpec
from lmforge.adapters.dora import DoraLinear, DoraSpec
from lmforge.adapters.ia3 import Ia3Linear, Ia3Spec
from lmforge.adapters.lora import (LoraLinear, LoraSpec, apply_lora, disable_lora, lora_state_dict, merge_lora,
                                   unmerge_lora, unwrap_lora)
from lmforge.adapters.peft_io import adapter_folder_kind, load_adapter, read_adapter_config, save_adapter
from lmforge.adapters.prompt import PromptSpec, PromptTuning
from lmforge.adapters.registry import (KINDS, AdapterKind, adapter_kind, apply_adapter, check_task, get_kind,
                                       register_adapter, validate_options)

__all__ = [
    "KINDS", "AdapterKind", "AdapterLayer", "BottleneckAdapter", "BottleneckSpec", "DoraLinear", "DoraSpec",
    "Ia3Linear", "Ia3Spec", "LoraLinear", "LoraSpec", "ModelAdapter", "ModulesToSave", "PromptSpec",
    "PromptTuning", "adapter_folder_kind", "adapter_kind", "adapter_modules", "adapter_state_dict",
    "apply_adapter", "apply_lora", "check_task", "disable_adapters", "disable_lora", "format_trainable",
    "get_kind", "load_adapter", "lora_state_dict", "merge_adapters", "merge_lora", "read_adapter_config",
    "register_adapter", "save_adapter", "trainable_parameters", "unmerge_adapters", "unmerge_lora",
    "unwrap_adapters", "unwrap_lora", "validate_options",
]
