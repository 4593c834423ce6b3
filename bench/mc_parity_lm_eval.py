"""Accuracy parity of `lmforge eval --task mc` with lm-evaluation-harness on the same questions.

Usage: python bench/mc_parity_lm_eval.py SUITE N   (one trial, lm-eval side only; the lmforge side is
`lmforge eval smollm2 --task mc --suite SUITE --limit N`). Writes a local lm-eval task (JSONL + YAML) built
from the lmforge suite items into a temporary folder, runs lm-eval on the packaged smollm2 (fp32, batch 1,
one thread, offline) and prints one JSON line. Not a timing benchmark (no alternation/repetitions).
"""
import json, os, sys, time
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
suite, limit = sys.argv[1], int(sys.argv[2])
from lmforge.eval.mc_suites import load_suite
from lmforge.models import resolve_model
items = load_suite(suite)[0][:limit]
import tempfile
d = tempfile.mkdtemp(prefix="lmeval_task_")
from pathlib import Path
from lmforge.rundir import write_jsonl, write_text
write_jsonl(Path(f"{d}/{suite}.jsonl"),
            [{"ctx": it.context, "choices": [o[1:] for o in it.options], "label": it.answer} for it in items])
write_text(Path(f"{d}/{suite}.yaml"), f"""task: lmforge_{suite}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d}/{suite}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
import torch; torch.set_num_threads(1)
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
t0 = time.perf_counter()
res = simple_evaluate(model="hf", model_args=f"pretrained={resolve_model('smollm2')},dtype=float32",
                      tasks=[f"lmforge_{suite}"], task_manager=TaskManager(include_path=d), batch_size=1,
                      device="cpu", bootstrap_iters=1000)
r = res["results"][f"lmforge_{suite}"]
print(json.dumps({"suite": suite, "n": len(items), "lm_eval": {k: v for k, v in r.items() if "acc" in k},
                  "seconds": round(time.perf_counter() - t0, 1)}))
