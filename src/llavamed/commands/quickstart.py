"""``llavamed quickstart``: the whole pipeline end to end on the embedded default."""

from __future__ import annotations

from llavamed.cli import DefaultsHelpFormatter
from llavamed.commands import positive_int, seed_int


def register(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="run the whole LLaVA-Med pipeline end to end on a laptop CPU (embedded default)",
        description=(
            "MedSynth world -> PMC ingestion + domain labels -> alignment set -> self-instruct "
            "conversations from the embedded SmolLM2 behind a local OpenAI-compatible server -> "
            "stage 0 (vision pretraining on rendered single-panel figure-caption pairs) -> stage 0b "
            "(the tower learns the VQA train split) -> stage 1 -> stage 2 -> zero-shot VQA -> VQA "
            "fine-tuning -> VQA + blank-image ablation -> report.md/report.json/loss.png. "
            "Re-running skips finished stages; a killed run resumes inside the stage it "
            "stopped in; a stage that runs again (changed settings, output files deleted or "
            "edited since it finished, self-instruct requests to retry, a new MedSynth generator "
            "version) "
            "reruns every later stage that reads its output (self-instruct's output is read "
            "by stage 2 only, so a retry of it does not redo the vision stages)."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--out",
        default="quickstart_out",
        help="output folder (one quickstart at a time per folder)",
    )
    p.add_argument(
        "--size",
        default="small",
        choices=["tiny", "small", "medium"],
        help="small: 18 min after set-up on 2 cores of an Intel Xeon with AMX (bf16; two fresh "
        "clones, 89.4%% and 89.9%% strict closed accuracy), about 40 on 2 AVX2-only cores (fp32; "
        "44 min for the previous 3-epoch recipe on a Zen 3); medium: the same recipe on twice the "
        "VQA images for longer, 1 h 25 min on 2 Zen 3 cores, 90.3-91.0%% strict closed on the "
        "whole test split; tiny: a few-minute smoke run of every stage that learns little",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed for data and training")
    p.add_argument(
        "--workers", type=positive_int, default=2, help="processes for data generation/ingestion"
    )
    p.add_argument(
        "--vision",
        metavar="DIR",
        default=None,
        help="a pretrained vision tower folder (a stage-0 run's vision_tower/, a converted "
        "BiomedCLIP tower): skips stage 0; stage 0b and stage 1 start from it (without it, "
        "stage 0 trains one from random weights); it must lie outside --out, whose stage "
        "folders a rerun may empty",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="send the self-instruct requests to the local server one at a time, so that the "
        "conversations, and every number after them, repeat exactly from run to run (small: "
        "about 2.5 minutes slower on 2 AMX cores, 20 min 47 s after set-up). By default 8 go "
        "at once, and the server's batching of them as they arrive changes the sampled "
        "conversations from run to run with bf16",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from llavamed.quickstart import QuickstartOptions, run_quickstart

    report = run_quickstart(
        QuickstartOptions(
            out=Path(args.out),
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            progress=not args.no_progress,
            vision=Path(args.vision) if args.vision else None,
            deterministic=args.deterministic,
        )
    )
    print(f"\nreport: {Path(report['output']) / 'report.md'}")
    ft = report["metrics"].get("finetuned", {})
    if "strict_closed_acc" in ft:
        print(f"fine-tuned strict closed accuracy: {100 * ft['strict_closed_acc']['mean']:.1f}%")
    for k, cmd in report["try_it"]["commands"].items():
        print(f"try {k}: {cmd}")
    return 0
