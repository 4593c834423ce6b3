"""Reinforcement learning from a reward: PPO, RLOO and GRPO on a causal LM (task ``rl``).

The engine's on-policy phase calls :meth:`RlTask.rollout` once per phase: ``rl.rollout_prompts``
prompts (a seeded shuffle per pass over the prompt set), ``k = rl.generations`` responses each,
sampled with the current policy (seeded by ``(seed, phase)``), scored by the reward, then one
forward each through the policy (old log-probs, values) and the reference (adapters off, or a
frozen copy for full fine-tuning). Advantages per algorithm (:mod:`lmforge.losses.rl`):

- ``ppo``: per-token reward ``-beta KL_t`` plus the score on the last token (Ziegler et al. 2019),
  GAE(gamma, lambda) with the value head, whitened; clipped policy + ``vf_coef`` x clipped value loss.
- ``rloo``: sequence reward ``score - beta sum_t KL_t``, leave-one-out baseline over the k samples
  of a prompt (Ahmadian et al. 2024); clipped policy loss.
- ``grpo``: ``(r - mean) / std`` over the k samples (Shao et al. 2024); clipped policy loss plus
  ``beta`` x the per-token KL (k3) in the loss.

``beta`` is fixed or adaptive (``kl_target``, ``kl_horizon``). Guards: a minibatch whose mean
probability ratio exceeds ``ratio_threshold`` is skipped (the engine drops its gradients); a
negative mean KL is warned about loudly; a reward mean that stays ``collapse_drop`` rollout
reward standard deviations (the largest seen) below its best for ``collapse_patience`` rollouts
stops the run.
"""
from __future__ import annotations

import copy
import logging
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.schema import field_column, load_splits
from ..device import move
from ..errors import LmforgeError
from ..kv_cache import folds_adapters
from ..losses import rl as L
from ..rl.fast import merged_adapters
from ..rl.guards import check_rollout, new_collapse_state
from ..rl.rollout import collate_rollout, distinct_n, gather_response, response_logps, sample_responses
from ..rundir import write_safetensors
from .base import register_task
from .causal import CausalTask, output_projection
from .rl_config import RlRun
from .rl_reward import build_reward

log = logging.getLogger(__name__)
VALUE_HEAD = "value_head.safetensors"


class PolicyValue(nn.Module):
    """The policy (a causal LM, possibly with adapters) and, for PPO, a value head on its final
    hidden states: ``V(h) = w^T h + b`` (H -> 1, fp32), trained with the policy."""

    def __init__(self, policy: nn.Module, value_head: nn.Module | None):
        super().__init__()
        self.policy, self.value_head = policy, value_head


@register_task("rl", config=RlRun)
class RlTask(CausalTask):
    name = "rl"
    section = "rl"
    on_policy = True

    def __init__(self, cfg: RlRun, *, reward=None, **kw):
        from ..models import is_seq2seq_folder, resolve_model

        self._reward, self._ref = reward, None
        self.seq2seq = is_seq2seq_folder(kw.get("model_dir") or resolve_model(cfg.model.name, cfg.model.revision))
        if self.seq2seq:  # an encoder-decoder policy: the prompt is the encoder's, the response the decoder's
            self.peft_task_type = "SEQ_2_SEQ_LM"
        super().__init__(cfg, **kw)
        o = self.opts
        self.k = o.generations or (1 if o.algorithm == "ppo" else 4)
        if o.algorithm != "ppo" and self.k < 2:
            raise LmforgeError(f"rl.generations: {o.algorithm} needs at least 2 responses per prompt, got {self.k}")
        self.epochs = o.ppo_epochs or (4 if o.algorithm == "ppo" else 1)
        self.estimator = o.kl_estimator or ("k3" if o.algorithm == "grpo" else "k1")
        self.whiten = o.algorithm == "ppo" if o.whiten_advantages is None else o.whiten_advantages
        self.kl_ctl = (L.AdaptiveKLController(o.kl_coef, o.kl_target, o.kl_horizon) if o.kl_target
                       else L.FixedKLController(o.kl_coef))
        self.collapse = new_collapse_state()
        self.need_ref = not (o.fast_rollout and not o.kl_target and o.kl_coef == 0)  # fast paths: see fast_rollout
        self.need_old = True
        head = None
        if o.algorithm == "ppo":
            torch.manual_seed(cfg.seed)
            head = nn.Linear(self.model.config.hidden_size, 1)  # fp32 master weights
            nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
        self.model = PolicyValue(self.model, head)
        if not self.adapters and not kw.get("model_dir"):
            self._ref = copy.deepcopy(self.policy).requires_grad_(False).eval()  # the frozen reference
        if self.cfg.data.max_length <= o.max_new_tokens:
            raise LmforgeError(f"data.max_length ({self.cfg.data.max_length}) must exceed rl.max_new_tokens "
                               f"({o.max_new_tokens}): prompt and response share it")
        if self.train_items:
            n, g = o.rollout_prompts * self.k, cfg.train.batch_size * cfg.train.grad_accum
            if n % g:
                raise LmforgeError(f"train.batch_size: a rollout of rl.rollout_prompts x generations = {n} samples "
                                   f"is not a whole number of minibatches of batch_size x grad_accum = {g}")
            if len(self.train_items) < o.rollout_prompts:
                raise LmforgeError(f"rl.rollout_prompts ({o.rollout_prompts}) is more than the "
                                   f"{len(self.train_items)} training prompts")
            one_step = n == g and self.epochs == 1 and not o.kl_target  # ratio 1 by construction
            fast = o.fast_rollout and o.algorithm != "ppo" and one_step
            self.need_old = not (fast and (o.algorithm == "grpo" or not self.need_ref))  # rloo's KL is in its reward
            self.reward_fn  # a bad reward (unknown label, missing function) fails before any run folder exists

    # ---- data: prompts ------------------------------------------------------------------------
    def _prompts(self, table, split: str) -> list[dict]:
        col = field_column(self.cfg.data, "prompt")
        keep = self.cfg.data.max_length - self.opts.max_new_tokens
        items = []
        for i, rec in enumerate(table.records):
            where = table.where(i)
            prompt = self.prompt_value(rec, col, where)
            if isinstance(prompt, str) and not prompt.strip():
                raise LmforgeError(f"{where}: empty prompt")
            try:
                ids = self.fmt.prompt_ids(prompt)
            except LmforgeError as err:
                raise LmforgeError(f"{where}: {err}") from None
            items.append({"prompt": self.fmt.generation_prompt(prompt), "input_ids": ids[-keep:]})
        if not items:
            raise LmforgeError(f"{table.source}: no prompts in the {split} split (empty prompt set)")
        return items

    def load_data(self) -> None:
        train, ev = load_splits(self.cfg.data, self.cfg.seed)
        self.train_items = self._prompts(train, "train")
        self.eval_items = self._prompts(ev, "eval") if ev is not None else []

    def read_eval_file(self, path: str) -> list[dict]:
        from ..data.readers import read_table
        from ..data.schema import apply_where

        return self._prompts(apply_where(read_table(path), self.cfg.data.where), "eval")

    # ---- models ---------------------------------------------------------------------------------
    @property
    def core(self) -> nn.Module:
        return self.model.policy if isinstance(self.model, PolicyValue) else self.model

    policy = core

    @property
    def reward_fn(self):
        if self._reward is None:
            self._reward = build_reward(self.opts, self.placement.device)
        return self._reward

    def _reference(self):
        """A context giving the reference model: the policy with adapters off, or the frozen copy."""
        import contextlib

        if self.adapters:
            from ..adapters.base import disable_adapters

            return disable_adapters(self.policy)
        if self._ref is None:  # a finished full run: the base model named by the config
            from ..models import resolve_model
            from .causal import load_base

            base = resolve_model(self.cfg.model.name, self.cfg.model.revision)
            self._ref = load_base(base, self.tokenizer).requires_grad_(False).eval()
        self._ref.to(self.placement.device)
        return contextlib.nullcontext(self._ref)

    def build_model(self, adapter_dir=None, full: bool = False) -> nn.Module:
        from .sft import SftTask

        if self.seq2seq:  # the seq2seq building of sft: same modes, seq2seq adapter targets
            return SftTask.build_model(self, adapter_dir, full)
        return super().build_model(adapter_dir, full)

    def hidden(self, batch: dict, model: nn.Module | None = None) -> torch.Tensor:
        """(B, T, H) final (decoder) hidden states, scaled as the LM head expects them."""
        if not self.seq2seq:
            return super().hidden(batch, model)
        from ..causal_lm import seq2seq_head, seq2seq_hidden

        h = seq2seq_hidden(model, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        scale = seq2seq_head(model)[2]
        return h * scale if scale != 1.0 else h

    def head(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.seq2seq:
            from ..causal_lm import seq2seq_head

            return seq2seq_head(model)[:2]
        return output_projection(model)

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """(B, L, H) hidden states -> (B, L) values, the head in fp32."""
        head = self.model.value_head
        with torch.autocast(h.device.type, enabled=False):
            return head(h.float()).squeeze(-1)

    # ---- rollouts --------------------------------------------------------------------------------
    def rollout_plan(self) -> tuple[int, int, int]:
        o = self.opts
        return o.rollout_prompts * self.k, len(self.train_items) // o.rollout_prompts, self.epochs

    def _generate(self, prompts: list[dict], seed: int) -> list[list[int]]:
        from ..generation import GenerationConfig, eos_token_ids

        o = self.opts
        gcfg = GenerationConfig(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_k=o.top_k,
                                top_p=o.top_p, batch_size=o.generation_batch_size, sampler=o.sampler)
        eos = eos_token_ids(self.policy, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        gen = torch.Generator(device=self.placement.device).manual_seed(seed)
        # the fast decode merges LoRA into its packed weights itself (in place, no copies)
        fold = o.merged_generation and not folds_adapters(self.policy)
        with self.placement.autocast(), (merged_adapters(self.policy) if fold else nullcontext()):
            return sample_responses(self.policy, [p["input_ids"] for p in prompts], gcfg, eos_ids=eos, pad_id=pad,
                                    generator=gen)

    def _text(self, response_ids: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        ids = response_ids[:-1] if response_ids and response_ids[-1] == eos else response_ids
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def _token_stats(self, items: list[dict], with_values: bool, old: bool = True, ref: bool = True) -> None:
        """Attach ``old_logps`` (when ``old``), ``ref_logps`` (when ``ref``) and ``values`` per response token."""
        bs = self.opts.generation_batch_size
        for s in range(0, len(items) if (old or ref or with_values) else 0, bs):
            chunk = items[s:s + bs]
            batch = move(self.collate(chunk), self.placement.device)
            stats = {}
            with self.placement.autocast():
                if old or with_values:
                    h = gather_response(self.hidden(batch, self.policy), batch["response_index"])  # (b, L, H)
                    if old:
                        stats["old_logps"] = response_logps(h, *self.head(self.policy), batch["response_ids"])[0]
                    if with_values:
                        stats["values"] = self.values(h)
                if ref:
                    with self._reference() as model:
                        h_ref = gather_response(self.hidden(batch, model), batch["response_index"])
                        stats["ref_logps"] = response_logps(h_ref, *self.head(model), batch["response_ids"])[0]
            for r, it in enumerate(chunk):
                n = len(it["response_ids"])
                it.update({k: v[r, :n].float().cpu() for k, v in stats.items()})

    def _sample(self, prompts: list[dict], seed: int, with_values: bool,
                fast: bool = False) -> tuple[list[dict], torch.Tensor]:
        """Generate, score and attach token statistics; returns (items, raw scores (N,))."""
        responses = self._generate(prompts, seed)
        texts = [self._text(r) for r in responses]
        scores = self.reward_fn([p["prompt"] for p in prompts], texts)
        scores = torch.tensor(scores, dtype=torch.float32) * self.opts.reward_scale  # (N,)
        items = [{"prompt_ids": p["input_ids"], "response_ids": r, "prompt": p["prompt"], "text": t}
                 for p, r, t in zip(prompts, responses, texts)]
        self._token_stats(items, with_values, *((self.need_old, self.need_ref) if fast else (True, True)))
        return items, scores

    def rollout(self, phase: int) -> dict:
        o, n_prompts = self.opts, len(self.train_items)
        per_epoch = n_prompts // o.rollout_prompts
        epoch, r = divmod(phase, per_epoch)
        order = list(range(n_prompts))
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        chosen = order[r * o.rollout_prompts:(r + 1) * o.rollout_prompts]
        prompts = [self.train_items[i] for i in chosen for _ in range(self.k)]  # prompt-major
        items, scores = self._sample(prompts, (self.cfg.seed * 1_000_003 + 7919 * (phase + 1)) % 2**63,
                                     o.algorithm == "ppo", fast=True)
        batch = collate_rollout(items, 0)
        mask = batch["response_mask"]  # (N, L)
        beta = self.kl_ctl.value
        metrics = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                   "kl_coef": beta, "response_length": float(mask.sum(1).mean())}
        kl = seq_kl = torch.zeros(mask.shape)  # (N, L): no KL (beta = 0, or grpo's is in the loss: logged there)
        if "old_logps" in batch and "ref_logps" in batch:
            kl = L.kl_penalty(batch["old_logps"], batch["ref_logps"], mask, estimator=self.estimator)  # (N, L)
            seq_kl = L.kl_penalty(batch["old_logps"], batch["ref_logps"], mask, estimator="k1").sum(1)  # (N,)
            metrics |= {"kl": float(seq_kl.mean()),
                        "kl_se": float(seq_kl.std() / len(seq_kl) ** 0.5) if len(seq_kl) > 1 else 0.0}
        if o.algorithm == "ppo":
            rewards = L.kl_shaped_rewards(scores, kl, mask, kl_coef=beta)  # (N, L)
            adv, ret = L.gae(rewards, batch["values"], mask, gamma=o.gamma, lam=o.lam)
            ev = float(L.explained_variance(batch["values"], ret, mask))  # NaN when every return is equal:
            metrics["value_explained_variance"] = ev if ev == ev else 0.0  # then 0, as sklearn's force_finite
            if self.whiten:
                adv = L.masked_whiten(adv, mask)
            for i, it in enumerate(items):
                n = len(it["response_ids"])
                it["advantages"], it["returns"] = adv[i, :n].clone(), ret[i, :n].clone()
        else:
            if o.algorithm == "rloo":
                adv = L.rloo_advantages(scores - beta * (kl * mask).sum(1), self.k)  # (N,)
            else:
                adv = L.grpo_advantages(scores, self.k)
            if self.whiten and len(adv) > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            for it, a in zip(items, adv.tolist()):
                it["advantage"] = a
        self._guards(phase, metrics, scores)
        self.kl_ctl.update(metrics.get("kl", 0.0), len(items))  # adaptive: the KL is always computed
        samples = [{"phase": phase, "prompt": it["prompt"], "response": it["text"], "reward": float(s)}
                   | ({"kl": float(seq_kl[i])} if "kl" in metrics else {})
                   for i, (it, s) in enumerate(zip(items[:o.log_samples], scores.tolist()))]
        return {"items": items, "metrics": metrics, "samples": samples}

    def _guards(self, phase: int, metrics: dict, scores: torch.Tensor) -> None:
        check_rollout(phase, metrics, self.collapse, self.opts.collapse_drop, self.opts.collapse_patience)

    def loop_state(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "collapse": dict(self.collapse)}

    def load_loop_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.collapse = dict(state["collapse"])

    # ---- the loss over a minibatch -------------------------------------------------------------------
    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        start = None
        if self.seq2seq:
            from ..causal_lm import decoder_start_id

            start = decoder_start_id(self.policy)
        return collate_rollout(items, self.tokenizer.pad_token_id or 0, start)

    def batch_units(self, batch: dict) -> int:
        """Response tokens: the losses are token means over the minibatch."""
        return int(batch["response_mask"].sum())

    def batch_tokens(self, batch: dict) -> int:
        if self.seq2seq:  # prompt (encoder) + response (decoder) tokens
            return int(batch["attention_mask"].sum() + batch["response_mask"].sum())
        return int((batch["input_ids"] != (self.tokenizer.pad_token_id or 0)).sum())

    def loss(self, batch):
        o = self.opts
        mask = batch["response_mask"]  # (B, L)
        h = gather_response(self.hidden(batch, self.policy), batch["response_index"])  # (B, L, H)
        logps, ent = response_logps(h, *self.head(self.policy), batch["response_ids"],
                                    with_entropy=True)  # (B, L), (B, L)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()  # fast path: one step, ratio 1
        ratio_mean = float(L.masked_mean(torch.exp((logps.detach() - old) * mask), mask))
        entropy = L.masked_mean(ent, mask)
        metrics = {"entropy": float(entropy.detach()), "ratio_mean": ratio_mean, "skip": 0.0}
        if ratio_mean > o.ratio_threshold:  # the guard: this minibatch's gradients are dropped
            log.warning("rl: minibatch skipped, mean probability ratio %.3g > rl.ratio_threshold %g",
                        ratio_mean, o.ratio_threshold)
            return (logps * mask).sum() * 0.0, metrics | {"skip": 1.0}
        adv = batch["advantages"] if o.algorithm == "ppo" else batch["advantage"]
        pg, clip_frac, approx_kl = L.policy_loss(logps, old, adv, mask, clip_eps=o.clip_range,
                                                 clip_eps_high=o.clip_range_high)
        loss = pg
        metrics |= {"pg_loss": float(pg.detach()), "clip_fraction": float(clip_frac), "approx_kl": float(approx_kl)}
        if o.algorithm == "ppo":
            vf, vclip = L.value_loss(self.values(h), batch["values"], batch["returns"], mask,
                                     clip_range=o.clip_range_value)
            loss = loss + o.vf_coef * vf
            metrics |= {"vf_loss": float(vf.detach()), "value_clip_fraction": float(vclip)}
        if o.algorithm == "grpo" and self.kl_ctl.value > 0:
            kl = L.masked_mean(L.kl_penalty(logps, batch["ref_logps"], mask, estimator=self.estimator), mask)
            loss = loss + self.kl_ctl.value * kl
            if "old_logps" not in batch:  # the rollout skipped the policy forward: its KL is logged here
                metrics["kl"] = float(((logps.detach() - batch["ref_logps"]) * mask).sum(1).mean())
        if o.entropy_coef:
            loss = loss - o.entropy_coef * entropy
        return loss, metrics

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, items: Sequence[dict] | None = None) -> dict:
        """Held-out prompts, one sampled response each (the training sampler, a fixed seed): reward
        mean/std, KL to the reference (k1, summed per response), response length, distinct-2, and
        ``objective = reward_mean - rl.kl_coef * kl`` (the KL-regularised reward, with the configured
        coefficient so steps compare; ``train.best_metric: objective`` keeps the step that balances
        reward and drift, and its checkpoint survives rotation)."""
        items = list(self.eval_items if items is None else items)
        if not items:
            raise LmforgeError("no evaluation prompts")
        was = self.model.training
        self.model.eval()
        out, scores = self._sample(items, self.cfg.seed + 104729, with_values=False)
        self.model.train(was)
        batch = collate_rollout(out, 0)
        mask = batch["response_mask"]
        seq_kl = L.kl_penalty(batch["old_logps"], batch["ref_logps"], mask, estimator="k1").sum(1)
        self.last_generations = [{"prompt": it["prompt"], "response": it["text"], "reward": float(s)}
                                 for it, s in zip(out, scores.tolist())]
        reward, kl = float(scores.mean()), float(seq_kl.mean())
        return {"reward_mean": reward, "reward_std": float(scores.std()) if len(out) > 1 else 0.0,
                "kl": kl, "objective": reward - self.opts.kl_coef * kl, "response_length": float(mask.sum(1).mean()),
                "distinct_2": distinct_n([it["text"] for it in out], 2), "n": len(out)}

    # ---- saving ------------------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        """The policy (adapter/ or model/) and, for PPO, ``value_head.safetensors`` inside that folder."""
        super().save(out_dir)
        head = self.model.value_head
        if head is not None:
            folder = Path(out_dir) / ("adapter" if self.adapters else "model")
            write_safetensors(folder / VALUE_HEAD, {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()})

    @classmethod
    def from_run(cls, run_dir, which: str = "final") -> "RlTask":
        from safetensors.torch import load_file

        from ..rundir import open_run

        task = super().from_run(run_dir, which)
        head = task.model.value_head
        folder = open_run(run_dir, which).root / ("adapter" if task.adapters else "model")
        if head is not None and (folder / VALUE_HEAD).is_file():
            head.load_state_dict(load_file(str(folder / VALUE_HEAD)))
        return task
