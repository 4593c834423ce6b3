"""The training loop every task shares.

fit(task) -> AdamW with decoupled decay on matrices only, warmup + linear/cosine schedule,
gradient accumulation weighted by loss units, clipping, autocast precision, evaluation every N
steps and at the end, best tracking, atomic checkpoints with exact resume, NaN/inf guard,
metrics.jsonl/TensorBoard/progress bar, and data parallelism under torchrun.

On-policy tasks (``task.on_policy``, e.g. ``rl``) train in phases: at the start of phase ``p``
the task makes a rollout batch with the current policy in eval mode (``task.rollout(p)``:
generate with a sampler seeded by ``(seed, p)``, score, compute advantages), then the engine
runs ``opt_epochs`` passes of shuffled minibatches over it, each minibatch one optimizer step
through the same window/accumulation/clipping/schedule path as every other task. Checkpoints
are written only at phase boundaries (a ``save_every`` that falls inside a phase is honoured at
its end), with the task's own state (``task.loop_state()``, e.g. an adaptive KL coefficient),
so a killed run resumes with the same rollouts as an uninterrupted one. A task's loss may
report the metric ``skip`` > 0 (a guard, e.g. an exploding probability ratio): the step's
gradients are dropped and the optimizer does not move (the schedule still advances).

The engine owns distribution: tasks always see their plain model. Under torchrun each rank runs
its shard of every micro-batch and the engine sums the gradients over ranks (one all-reduce per
optimizer step, :func:`lmforge.train.distributed.all_reduce_grads`), which gives exactly the
gradient of the global batch because each micro-batch's loss is weighted by its share of the
global units.
"""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from ..config import RunConfig
from ..data.batching import step_batches
from ..device import HostMemoryTrimmer, move
from ..errors import LmforgeError, TrainingError
from ..rundir import CHECKPOINTS, EVAL, clean_stale_tmp, save_config, truncate_metrics, write_json, write_jsonl
from . import checkpoint as ckpt
from .distributed import DistEnv, all_reduce_grads, all_sum, barrier, init_distributed, shard
from .logging import RunLogger, progress
from .optim import build_optimizer, lr_lambda

if TYPE_CHECKING:  # the engine only calls the protocol; tasks sit above it
    from ..tasks.base import Task

log = logging.getLogger(__name__)
SAMPLES = "samples"  # on-policy runs: each rollout's sample generations (samples/rollout-NNNNNN.jsonl)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_batches(task: Task, cfg: RunConfig, epoch: int, world: int) -> list[list[int]]:
    """Micro-batches (indices into task.train_items, ``batch_size * world`` each) of one epoch;
    each ``grad_accum`` consecutive ones are one step's global batch (:func:`step_batches`)."""
    tc = cfg.train
    lengths = [task.item_length(it) for it in task.train_items] if tc.group_by_length else None
    return step_batches(lengths, len(task.train_items), tc.batch_size, grad_accum=tc.grad_accum, world=world,
                        seed=cfg.seed, epoch=epoch, drop_last=world > 1)


def rollout_batches(cfg: RunConfig, n: int, phase: int, opt_epochs: int, world: int) -> list[list[int]]:
    """Micro-batches (indices into a rollout of ``n`` samples) of one on-policy phase:
    ``opt_epochs`` seeded shuffles, each cut into whole steps of ``batch_size * grad_accum * world``
    samples (``n`` is a multiple of that, checked by :func:`phase_plan`)."""
    tc = cfg.train
    out: list[list[int]] = []
    for e in range(opt_epochs):
        out += step_batches(None, n, tc.batch_size, grad_accum=tc.grad_accum, world=world, seed=cfg.seed,
                            epoch=phase * opt_epochs + e)
    return out


def phase_plan(task: Task, cfg: RunConfig, world: int) -> tuple[int, int]:
    """(optimizer steps per on-policy phase, phases in the run) from ``task.rollout_plan()``
    (samples per rollout, rollouts per epoch of prompts, optimisation epochs per rollout).
    ``train.max_steps`` is rounded up to whole phases (a phase's steps share one rollout)."""
    tc = cfg.train
    n, per_epoch, opt_epochs = task.rollout_plan()
    g = tc.batch_size * tc.grad_accum * world
    if n % g:
        raise LmforgeError(f"train.batch_size: a rollout of {n} samples is not a whole number of minibatches of "
                           f"batch_size x grad_accum{' x world' if world > 1 else ''} = {g}")
    per_phase = opt_epochs * n // g
    phases = math.ceil(tc.max_steps / per_phase) if tc.max_steps else math.ceil(tc.epochs * per_epoch)
    return per_phase, max(1, phases)


def backward_window(task: Task, micro: list[dict], env: DistEnv, device: torch.device,
                    placement, scaler=None) -> tuple[float, dict, int]:
    """Forward/backward over micro-batches so the summed gradient equals one big batch's.

    Each micro-batch's mean loss is weighted by ``units_i / units_total`` (units summed over
    ranks), so ``sum_i w_i grad(L_i)`` summed over ranks (:func:`all_reduce_grads`, done by the
    caller) is the gradient of the global batch's mean loss.
    Returns (window loss, averaged metrics, local units).
    """
    units = [task.batch_units(m) for m in micro]
    local = sum(units)
    total = all_sum(local, env, device)
    if total <= 0:
        raise LmforgeError("a training batch has no trainable units (all targets masked?)")
    loss_val, metrics_acc = 0.0, {}
    for m, u in zip(micro, units):
        with placement.autocast():
            loss, metrics = task.loss(m)
        scaled = loss * (u / total)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_val += float(loss.detach()) * u
        for k, v in metrics.items():
            metrics_acc[k] = metrics_acc.get(k, 0.0) + float(v) * u
    loss_global = all_sum(loss_val, env, device) / total
    return loss_global, {k: v / max(local, 1) for k, v in metrics_acc.items()}, local


def _better(value: float, best: float | None, greater: bool) -> bool:
    return best is None or (value > best if greater else value < best)


def fit(task: Task, cfg: RunConfig, run_dir: Path, on_step=None) -> dict:
    """Train ``task`` per ``cfg.train``; write checkpoints, metrics and the artefact into run_dir.

    ``on_step(step, record)`` is called after every optimizer step (record: loss, lr, samples).
    Returns the final evaluation metrics (also written to ``eval.json``).
    """
    tc = cfg.train
    placement = task.placement
    device = placement.device
    trim_host_memory = HostMemoryTrimmer()  # the C heap's free pages back to the OS every 8th step
    env = init_distributed(device)
    seed_everything(cfg.seed)
    model = task.model.to(device)
    task.model = model
    if tc.activation_checkpointing:
        placement.checkpoint_activations(model)
    if not task.train_items:
        raise LmforgeError("the training split is empty")

    on_policy = bool(getattr(task, "on_policy", False))
    if on_policy:
        per_phase, phases = phase_plan(task, cfg, env.world)
        total = per_phase * phases
        if tc.max_steps and total != tc.max_steps:
            log.info("train.max_steps=%d rounded up to %d: whole rollouts of %d steps", tc.max_steps, total, per_phase)
    else:
        n_batches = len(epoch_batches(task, cfg, 0, env.world))
        if n_batches == 0:
            raise LmforgeError(f"not enough training examples for one global batch of {tc.batch_size * env.world}")
        steps_per_epoch = math.ceil(n_batches / tc.grad_accum)
        total = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    warmup = int(tc.warmup_ratio * total)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay)
    scheduler = LambdaLR(optimizer, lr_lambda(tc.schedule, warmup, total))
    scaler = placement.grad_scaler()
    ckpt_root = run_dir / CHECKPOINTS
    state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None}
    if env.is_main:
        clean_stale_tmp(ckpt_root)  # folders of a checkpoint write that was killed

    if tc.resume:
        state = ckpt.resume_from(ckpt_root, model, optimizer, scheduler, log if env.is_main else _quiet) or state
        if on_policy and state["batch"]:
            raise LmforgeError(f"{ckpt_root}: checkpoint of step {state['step']} is inside a rollout phase; "
                               "on-policy runs resume from phase boundaries (remove it to use the previous one)")
        if "task" in state:
            task.load_loop_state(state["task"])
        if env.is_main:  # each step is logged once: drop the records of steps the run does again
            truncate_metrics(run_dir, state["step"])
            save_config(run_dir, cfg)  # the resumed run has started cleanly: now its config is saved
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    logger = RunLogger(run_dir, enabled=env.is_main, purge_step=state["step"] + 1 if tc.resume else None)

    bar = progress(total, state["step"], tc.progress and env.is_main)
    eval_metrics: dict = {}
    last_good: Path | None = (ckpt.list_checkpoints(ckpt_root) or [None])[-1]
    window_t0, window_samples, window_tokens = time.perf_counter(), 0, 0
    acc_loss, acc_n, acc_metrics = 0.0, 0, {}
    step = start_step = state["step"]
    save_due = eval_due = False  # on-policy: a save/eval_every step fell inside a phase; done at its end
    items, phase_metrics = task.train_items, {}
    try:
        while step < total:
            if on_policy:
                items, phase_metrics = _rollout(task, state["epoch"], env, run_dir, last_good, logger, step)
                batches = rollout_batches(cfg, len(items), state["epoch"], task.rollout_plan()[2], env.world)
            else:
                batches = epoch_batches(task, cfg, state["epoch"], env.world)
            b = state["batch"]
            if b >= len(batches):  # an older checkpoint saved the end of an epoch as its last batch
                state.update(epoch=state["epoch"] + 1, batch=0)
                continue
            while b < len(batches) and step < total:
                window = batches[b:b + tc.grad_accum]
                micro = [move(task.collate([items[j] for j in shard(g, env)]), device) for g in window]
                window_samples += sum(len(g) for g in window)
                window_tokens += int(all_sum(sum(task.batch_tokens(m) for m in micro), env, device))
                model.train()
                loss_val, metrics, _ = backward_window(task, micro, env, device, placement, scaler)
                all_reduce_grads(trainable, env)
                if not math.isfinite(loss_val):
                    where = f"; last good checkpoint: {last_good}" if last_good else "; no checkpoint was written"
                    # the stop itself is a record (the run report shows "stopped at step N: non-finite loss")
                    logger.log({"step": step + 1, "event": "stopped", "reason": "non-finite loss",
                                "loss": str(loss_val)}, split="event")
                    raise TrainingError(f"non-finite loss ({loss_val}) at step {step + 1}, run stopped{where}")
                skipped = "skip" in metrics and all_sum(metrics["skip"], env, device) > 0
                if scaler is not None:
                    scaler.unscale_(optimizer)
                # the pre-clip global gradient norm, logged (max_norm=inf clips nothing: scale 1.0)
                grad_norm = 0.0 if skipped else float(
                    torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm or float("inf")))
                if skipped:  # a task guard refused this minibatch: its gradients are dropped
                    if scaler is not None:
                        scaler.update()
                elif scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                trim_host_memory(device)
                step += 1
                b += len(window)
                epoch_pos = round(state["epoch"] + b / len(batches), 4)
                state.update(step=step, batch=b)
                if b >= len(batches):  # the phase is over: the state points at the next one
                    state.update(epoch=state["epoch"] + 1, batch=0)
                acc_loss += loss_val
                acc_n += 1
                for k, v in (phase_metrics | metrics | {"grad_norm": grad_norm}).items():
                    acc_metrics[k] = acc_metrics.get(k, 0.0) + v
                bar.update(1)
                if on_step is not None:
                    on_step(step, {"loss": loss_val, "lr": lr, "samples": sum(len(g) for g in window)})
                if step % tc.log_every == 0 or step == total:
                    dt = max(time.perf_counter() - window_t0, 1e-9)
                    rec = {"step": step, "epoch": epoch_pos,
                           "loss": acc_loss / acc_n, "lr": lr,
                           "samples_per_s": window_samples / dt, "tokens_per_s": window_tokens / dt}
                    rec |= {k: v / acc_n for k, v in acc_metrics.items()}
                    logger.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{rec['samples_per_s']:.1f}")
                    window_t0, window_samples, window_tokens = time.perf_counter(), 0, 0
                    acc_loss, acc_n, acc_metrics = 0.0, 0, {}
                # on-policy: an eval_every step inside a phase evaluates at the phase's end (as a save does), so a
                # best step is always a checkpointed step (and rotation keeps it)
                eval_due = eval_due or bool(tc.eval_every and step % tc.eval_every == 0)
                if (eval_due and not (on_policy and state["batch"])) or step == total:
                    eval_due = False
                    eval_metrics = _evaluate(task, env, logger, step, tc, state, run_dir)
                save_due = save_due or bool(tc.save_every and step % tc.save_every == 0)
                if save_due and step < total and not (on_policy and state["batch"]):
                    save_due = False
                    if env.is_main:
                        last_good = ckpt.save_checkpoint(ckpt_root, step, model, optimizer, scheduler,
                                                         _loop(state, task), tc.keep_last, state["best_step"])
                    barrier(env)
        if step == start_step:  # resumed at the end (killed after the last checkpoint): evaluate it again
            eval_metrics = _evaluate(task, env, logger, step, tc, state, run_dir)
    finally:
        bar.close()
        logger.close()
    if env.is_main:
        if tc.save_every:
            ckpt.save_checkpoint(ckpt_root, step, model, optimizer, scheduler, _loop(state, task), tc.keep_last,
                                 state["best_step"])
        final = {"step": step} | eval_metrics
        if state["best"] is not None:
            final |= {"best_step": state["best_step"], f"best_{tc.best_metric}": state["best"]}
        write_json(run_dir / EVAL, final)
    barrier(env)
    return eval_metrics


def _loop(state: dict, task: Task | None = None) -> dict:
    out = {k: state[k] for k in ("epoch", "batch", "best", "best_step")}
    task_state = task.loop_state() if task is not None and hasattr(task, "loop_state") else {}
    return out | ({"task": task_state} if task_state else {})


def _rollout(task: Task, phase: int, env: DistEnv, run_dir: Path, last_good: Path | None, logger: RunLogger,
             step: int) -> tuple[list, dict]:
    """One on-policy rollout with the model in eval mode and no gradients; its sample
    generations go to ``samples/rollout-NNNNNN.jsonl``. Returns (items, metrics logged with
    every step of the phase). A task that stops the run (e.g. on reward collapse) raises
    TrainingError; the last good checkpoint is named."""
    model = task.model
    model.eval()
    try:
        with torch.no_grad():
            out = task.rollout(phase)
    except TrainingError as err:
        where = f"; last good checkpoint: {last_good}" if last_good else "; no checkpoint was written"
        logger.log({"step": step, "event": "stopped", "reason": str(err).split(":")[0]}, split="event")
        raise TrainingError(f"{err}{where}") from None
    finally:
        model.train()
    if env.is_main and out.get("samples"):
        write_jsonl(run_dir / SAMPLES / f"rollout-{phase:06d}.jsonl", out["samples"])
    return list(out["items"]), {k: float(v) for k, v in out.get("metrics", {}).items()}


def check_best_metric(task: Task, cfg: RunConfig, probe_items: int = 8) -> None:
    """Refuse an unknown ``train.best_metric`` before anything trains (or any run folder exists):
    the task is evaluated once on a few eval items, with every random state put back afterwards
    (training is unchanged) and lmforge's warnings held back (a class absent from 8 rows is not
    news), and the metric must be one of the numbers it reports."""
    key = cfg.train.best_metric
    if not key or type(task).train_direct.__qualname__ != "Task.train_direct":  # methods without the engine
        return
    if not task.eval_items:
        raise LmforgeError(f"train.best_metric={key}: there is no eval data to track it on "
                           "(set data.eval or data.eval_fraction > 0)")
    saved_items, was_training = task.eval_items, task.model.training
    py_state, np_state = random.getstate(), np.random.get_state()
    task.model.to(task.placement.device)
    lm_log = logging.getLogger("lmforge")  # the probe's metrics are discarded: so are its warnings
    level = lm_log.level
    lm_log.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            task.eval_items = list(saved_items[:probe_items])
            task.model.eval()
            metrics = task.evaluate()
    finally:
        lm_log.setLevel(level)
        task.eval_items = saved_items
        task.model.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)
    names = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if key not in names:
        raise LmforgeError(f"train.best_metric: {key!r:.60} is not an eval metric of task {cfg.task} "
                           f"(choose from {', '.join(names)})")


def _evaluate(task, env, logger, step, tc, state, run_dir) -> dict:
    metrics: dict = {}
    model = task.model
    if env.is_main and task.eval_items:
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate()
        model.train()
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        logger.log({"step": step} | flat, split="eval")
        key = tc.best_metric
        if key and key not in flat:
            raise LmforgeError(f"train.best_metric: {key!r:.60} is not an eval metric (choose from {', '.join(sorted(flat))})")
        if key and _better(flat[key], state["best"], tc.greater_is_better):
            state.update(best=flat[key], best_step=step)
            task.save(run_dir / "best")
    barrier(env)
    return metrics


class _quiet:
    """A logger for ranks other than 0."""

    @staticmethod
    def info(*a, **k): ...

    @staticmethod
    def warning(*a, **k): ...
