"""Where does a yes/no finding get lost inside a fine-tuned LLaVA? (``llavamed.eval.readout_trace``)

    .venv/bin/python benchmarks/readout_trace.py --model OUT/finetune/checkpoint-final \\
        --train slake=OUT/world/slake --train vqa-rad=OUT/world/vqa_rad \\
        --test slake=OUT/world/slake --top 6

For each question (``--question``, repeatable; default the ``--top`` most frequent yes/no
questions of the test split), linear probes trained on up to ``--max-train`` training questions
read the answer from the tower's tokens, the projector's output and the LM's last hidden state
after every layer; the last two columns are the model's own yes/no verdict. Prints a markdown
table; ``--out`` also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path


def _source(ap, spec: str, split: str):
    from llavamed.data.vqa import load_vqa

    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        ap.error(f"want DATASET=PATH, got {spec!r}")
    samples, _ = load_vqa(name, path, split=split)
    return [s for s in samples if s.answer.strip().lower() in ("yes", "no")]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="a native llava checkpoint folder")
    ap.add_argument("--train", action="append", required=True, metavar="DATASET=PATH")
    ap.add_argument("--test", required=True, metavar="DATASET=PATH")
    ap.add_argument("--question", action="append", default=None)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--max-train", type=int, default=400)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")  # torch.set_num_threads raised a RuntimeError

    import torch

    from llavamed.eval.readout_trace import trace_question, trace_table_md
    from llavamed.model.checkpoint import load_llava

    if args.threads:
        torch.set_num_threads(args.threads)
    train = [s for spec in args.train for s in _source(ap, spec, "train")]
    test = _source(ap, args.test, "test")
    by_q_train, by_q_test = collections.defaultdict(list), collections.defaultdict(list)
    for s in train:
        by_q_train[s.question].append(s)
    for s in test:
        by_q_test[s.question].append(s)
    questions = (
        args.question
        or [
            q
            for q, _ in collections.Counter(s.question for s in test).most_common()
            if len({s.answer.strip().lower() for s in by_q_train[q]}) == 2
        ][: args.top]
    )
    model, processor = load_llava(args.model)
    traces = []
    for q in questions:
        if not by_q_train[q] or not by_q_test[q]:
            ap.error(f"{q!r}: no yes/no samples in the train or test split")
        traces.append(
            trace_question(model, processor, by_q_train[q][: args.max_train], by_q_test[q])
        )
        print(f"traced {q!r}", flush=True)
    print(trace_table_md(traces))
    if args.out:
        Path(args.out).write_text(json.dumps([dataclasses.asdict(t) for t in traces], indent=1))
    return 0


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "readout_trace")
