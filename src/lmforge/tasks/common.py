"""Helpers shared by tasks: model surgery (freezing, LoRA), run-dir I/O."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import LoraConfig, RunConfig
from ..errors import LmforgeError
from ..rundir import atomic_dir, open_run, read_config, write_json, write_jsonl  # noqa: F401  (for tasks)


def module_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}


def pick_targets(model: nn.Module, wanted: list[str] | str | None, defaults: list[str]) -> list[str] | str:
    """User targets, else the defaults present in this architecture."""
    if wanted:
        return wanted
    have = module_names(model)
    chosen = [t for t in defaults if t in have]
    if not chosen:
        raise LmforgeError(f"no default LoRA targets ({', '.join(defaults)}) in this model; set lora.target_modules")
    return chosen


ADAPTER_MODES = ("lora", "adapter", "qlora")  # task modes that train the ``adapter:`` section's kind


def lora_spec(lc: LoraConfig, targets, modules_to_save: list[str]):
    from ..adapters.lora import LoraSpec

    return LoraSpec(r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=targets,
                    use_rslora=lc.use_rslora, modules_to_save=list(modules_to_save))


def add_adapter(model: nn.Module, cfg: RunConfig, defaults: list[str], heads: list[str], tokenizer=None) -> list[str]:
    """Apply ``cfg.adapter`` (kind + options) to ``model`` in place: unset targets take the task's
    ``defaults`` present in the model (kinds with their own placement ignore them), unset
    ``modules_to_save`` the task's ``heads``. Returns the adapted module names."""
    from ..adapters.registry import apply_adapter, get_kind

    spec = get_kind(cfg.adapter.kind).make_spec(cfg.adapter.options, default_targets=defaults,
                                                modules_to_save=heads, model=model)
    return apply_adapter(model, spec, tokenizer=tokenizer)


def load_run_adapter(model: nn.Module, cfg: RunConfig, folder: Path):
    """Load a run's ``adapter/`` folder, refusing one of another kind than ``cfg.adapter.kind``."""
    from ..adapters.peft_io import load_adapter

    return load_adapter(model, folder, kind=cfg.adapter.kind)


def layer_stack(model: nn.Module) -> nn.ModuleList | None:
    """The transformer block list (encoder.layer, model.layers, h ...): the longest ModuleList."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers", "h", "block", "blocks"):
            if best is None or len(m) > len(best):
                best = m
    return best


def freeze_except(model: nn.Module, trainable_names: list[str], unfreeze_last: int = 0) -> None:
    """Freeze everything except modules whose last name part is listed, and the last N blocks."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in trainable_names:
            for p in m.parameters():
                p.requires_grad_(True)
    if unfreeze_last:
        stack = layer_stack(model)
        if stack is None:
            raise LmforgeError("could not find the model's layer list to unfreeze the last layers")
        if unfreeze_last > len(stack):
            raise LmforgeError(f"unfreeze_last={unfreeze_last}: the model has only {len(stack)} layers")
        for block in list(stack)[-unfreeze_last:]:
            for p in block.parameters():
                p.requires_grad_(True)


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved in a run directory (:func:`lmforge.rundir.read_config`)."""
    return read_config(run_dir)


def save_weights(model: nn.Module, tokenizer, out_dir: Path, *, lora: bool, base_name: str,
                 task_type: str) -> None:
    """Write a trained model into ``out_dir``: ``adapter/`` (PEFT format) when LoRA-trained,
    else ``model/`` (a Hugging Face folder with the tokenizer), each atomically."""
    if lora:
        from ..adapters.peft_io import save_adapter

        save_adapter(model, out_dir / "adapter", base_model_name_or_path=base_name, task_type=task_type)
    else:
        with atomic_dir(out_dir / "model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)


def ready_for_inference(task) -> None:
    """Freeze the task's model, store it in the compute dtype if configured, move it, eval mode."""
    for p in task.model.parameters():
        p.requires_grad_(False)
    if task.cfg.model.frozen_in_compute_dtype:
        task.placement.cast_frozen(task.model)
    task.model.to(task.placement.device).eval()
