"""``llavamed eval answer``: a checkpoint's answers for a qa50-shaped question file."""

from __future__ import annotations

from llavamed.cli import DefaultsHelpFormatter
from llavamed.commands import add_dtype_arg, add_pack_weights_arg, positive_int
from llavamed.commands.eval_vqa import add_backend_arg


def register(sub) -> None:
    p = sub.add_parser(
        "answer",
        help="write a model's answers for a qa50-shaped questions file (input to 'eval judge')",
        description=(
            "Answer each question of a LLaVA-Med qa50-shaped JSONL ({question_id, image, text, ...}) "
            "with greedy batched decoding and the checkpoint's chat template; write LLaVA-Med's "
            "answers JSONL ({question_id, prompt, text, answer_id, model_id, metadata}). "
            "Re-running resumes; bad records and unreadable images are counted and skipped."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="transformers-native LLaVA checkpoint folder, or a training run's folder (its "
        "checkpoint-final)",
    )
    p.add_argument("--questions", required=True, help="qa50-shaped questions JSONL")
    p.add_argument(
        "--images", required=True, help="folder the records' 'image' names resolve against"
    )
    p.add_argument("--out", required=True, help="answers JSONL to write (appended, resumable)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="questions decoded together")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="answer length limit")
    add_backend_arg(p)
    add_pack_weights_arg(p)
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    add_dtype_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from llavamed.eval.answer import answer_questions
    from llavamed.utils.io import require_writable
    from llavamed.utils.precision import model_dtype

    # --out's folder is checked here, before any work, in the one wording every writer uses:
    # one that cannot be made (/proc/x, one under a file) was named without --out ("X: Not a
    # directory"), one on a read-only disk only by answer_questions' own probe. The answers
    # file itself (appendable, resumable with these settings) is probed there, also before the
    # model loads.
    require_writable(args.out, "--out")
    # A run folder means its checkpoint-final, as for serve, chat, web and train's model.from
    # (resolved there, after the questions file is checked).
    r = answer_questions(
        args.model,
        args.questions,
        args.images,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        dtype=model_dtype(args.dtype),
        backend=args.backend,
        pack_weights=args.pack_weights,
        progress=not args.no_progress,
    )
    msg = f"{r['n_generated']} answered, {r['n_resumed']} already done, of {r['n_questions']} questions"
    if r["bad"]:
        msg += "; bad records: " + ", ".join(f"{n} {k}" for k, n in r["bad"].items())
    if r["skipped"]:
        msg += "; skipped: " + ", ".join(f"{n} {k}" for k, n in r["skipped"].items())
    print(msg, file=sys.stderr)
    print(args.out)
    return 0
