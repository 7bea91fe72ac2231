"""The quickstart's stages, wired in order: what each runs, its settings and what it reads."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from llavamed.errors import ConfigError, InputError, LlavamedError
from llavamed.quickstart.configs import training_configs
from llavamed.quickstart.pipeline import (
    HEARTBEAT_FILE,
    OUTPUTS_FILE,
    STATE_FILE,
    Pipeline,
    Stage,
)
from llavamed.quickstart.presets import EVAL_DATASET, STAGE0B_ASPECT, QuickstartOptions, SizePreset
from llavamed.quickstart.report import _headline, build_report
from llavamed.utils.io import atomic_write_json, exclusive_lock

LOCK_FILE = ".quickstart.lock"


def _check_out_is_ours(out: Path) -> None:
    """Refuse an --out that holds files and is no quickstart output: a stage that starts over
    empties its folder (corpus/, stage0/, finetune/ ...), which would delete a user's own
    folder of that name."""
    if not out.is_dir() or (out / STATE_FILE).exists():
        return
    other = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if {OUTPUTS_FILE, HEARTBEAT_FILE} & set(other):
        raise ConfigError(
            f"--out {out}: a quickstart output whose {STATE_FILE} is gone, so none of its stages "
            "can be trusted as finished; delete the folder to start over, or give another --out"
        )
    if other:
        shown = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
        raise ConfigError(
            f"--out {out}: the folder is not empty ({shown}) and holds no {STATE_FILE}, so it "
            "is no quickstart output; give a new or empty folder (re-runs empty stage folders)"
        )


def _check_given_tower(opts: QuickstartOptions, out: Path) -> tuple[Path | None, str | None]:
    """``--vision``'s tower folder and fingerprint (None, None without one), refused before any
    work when it cannot serve."""
    from llavamed.model.vision_tower import tower_fingerprint

    given_tower = opts.check_vision()
    if given_tower is None:
        return None, None
    if given_tower.resolve().is_relative_to(out):
        # A stage that starts over empties its folder, which would take the given tower with it.
        raise ConfigError(
            f"--vision {opts.vision}: the tower lies inside --out {out}, whose stage folders a "
            "re-run may empty; copy it elsewhere (or use another --out) and give that path"
        )
    # Loaded now, not at stage 0b: a folder that is no tower (a LLaVA checkpoint has a
    # config.json too) failed there, after self-instruct (18 minutes of medium), with advice
    # to delete stage0b/.
    from llavamed.model.vision_tower import load_tower

    try:
        load_tower(str(given_tower))
    except InputError as exc:
        raise ConfigError(f"--vision {opts.vision}: {exc}") from exc
    return given_tower, tower_fingerprint(given_tower)


def _make_out(opts: QuickstartOptions, out: Path) -> None:
    try:
        _check_out_is_ours(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file, a name too long, a read-only or odd file system
        raise ConfigError(
            f"--out {opts.out}: cannot use it as the output folder "
            f"({exc.strerror or type(exc).__name__}); give a folder path you can write to"
        ) from exc


def run_quickstart(opts: QuickstartOptions) -> dict:
    p = opts.preset()
    out = Path(opts.out).expanduser().resolve()  # `--out=~/x` made a folder named ~
    given_tower, given_fp = _check_given_tower(opts, out)
    _make_out(opts, out)
    opts.out = out
    stages = QuickstartStages(opts, p, out, given_tower, given_fp).table()
    t0 = time.time()
    # Two runs on one --out would run the same stage into the same folder (and one's restart
    # would empty the other's live folder).
    with exclusive_lock(out / LOCK_FILE, "another `llavamed quickstart` run"):
        results = Pipeline(opts, stages, expected_s=p.stage_seconds).run()
        report = build_report(opts, results, time.time() - t0)
    return report


@dataclass
class QuickstartStages:
    """What each stage does on one preset and output folder (a method a stage, returning what
    the report shows of it), and ``table``, which wires them: each stage's folder, the settings
    in its key and the stages whose output it reads."""

    opts: QuickstartOptions
    p: SizePreset
    out: Path
    given_tower: Path | None = None
    """``--vision``: stage 0 is skipped and stage 0b starts from this tower."""
    given_fp: str | None = None
    world: Path = field(init=False)
    corpus: Path = field(init=False)
    cfgs: dict[str, dict] = field(init=False)

    def __post_init__(self) -> None:
        self.world, self.corpus = self.out / "world", self.out / "corpus"
        self.cfgs = training_configs(self.p, self.out, self.opts.seed, self.given_tower)
        ft = self.cfgs["finetune"]["train"]
        if ft.get("compile"):
            from llavamed.train.compile_layers import have_cpp_compiler

            if not have_cpp_compiler():
                # The one command should run anywhere: eager computes the same steps, slower.
                # The key changes with it, so a folder fine-tuned one way is not taken for the other.
                ft["compile"] = False
                print(
                    "quickstart: no C++ compiler (g++, c++ or clang++) on PATH, so fine-tuning "
                    "runs its LM layers eager, not compiled (about 1.4x slower; install g++ to "
                    "compile them)",
                    file=sys.stderr,
                )

    def synth(self) -> dict:
        from llavamed.data.synth import generate_world

        p = self.p
        m = generate_world(
            self.world,
            articles=p.articles,
            seed=self.opts.seed,
            image_size=p.image_size,
            workers=self.opts.workers,
            progress=self.opts.progress,
            vqa_images=p.vqa_images,
            train_closed=p.train_closed,
        )
        return {"counts": m.get("counts")}

    def ingest(self) -> dict:
        from llavamed.data.pmc.ingest import ingest as run_ingest

        rep = run_ingest(
            [self.world / "packages"],
            self.corpus,
            workers=self.opts.workers,
            progress=self.opts.progress,
        )
        return {
            k: rep.get(k) for k in ("figures_written", "skipped", "packages") if k in rep
        } or rep

    def align(self) -> dict:
        from llavamed.data.align import build_alignment
        from llavamed.data.figures import iter_figures

        samples, skipped = build_alignment(
            iter_figures(self.corpus / "figures.jsonl"),
            image_root=self.corpus,
            out_dir=self.corpus,
            seed=self.opts.seed,
        )
        atomic_write_json(self.corpus / "alignment.json", samples)
        return {"samples": len(samples), "skipped": skipped}

    def instruct(self) -> dict:
        from llavamed.data.instruct.runner import InstructOptions, run_instruct
        from llavamed.llm.client import ClientOptions
        from llavamed.serve.api import serve_in_background

        # bf16 where the CPU computes it (~4x faster than fp32 with AVX512-BF16/AMX), else fp32:
        # AVX2-only CPUs emulate bf16 and run it ~60x slower (utils/precision.py).
        server = serve_in_background(
            "embedded", dtype="auto", served_model_name="smollm2-135m-instruct"
        )
        try:
            report, rc = run_instruct(
                InstructOptions(
                    figures=self.corpus / "figures.jsonl",
                    out=self.corpus / "instruct" / "instruct.json",
                    client=ClientOptions(
                        base_url=server.base_url,
                        model="smollm2-135m-instruct",
                        concurrency=self.opts.instruct_concurrency,
                        timeout=600.0,
                    ),
                    inline_mentions=True,
                    max_samples=self.p.instruct_samples,
                    temperature=0.7,
                    max_tokens=256,
                    seed=self.opts.seed,
                    few_shot=2,
                    progress=self.opts.progress,
                )
            )
        finally:
            server.stop()
        if report["out"] is None:  # every request failed: stage 2 would have nothing to train on
            raise LlavamedError(
                f"self-instruct: all {report['pending_after_failures']} requests to the local "
                f"server failed ({report['failed_this_run']}); re-run the quickstart to retry"
            )
        if rc:
            print(
                f"quickstart: self-instruct went on without {report['pending_after_failures']} "
                f"figures whose requests failed ({report['failed_this_run']}); the next run of the "
                "same command retries them",
                file=sys.stderr,
            )
        return {
            "incomplete": bool(rc),  # the next run retries the failed figures
            "kept": report["totals"]["kept"],
            "dropped": report["totals"]["dropped"],
            "failed": report["pending_after_failures"],
            "requests": report["this_run"]["http_requests"],
            "cache_hits": report["this_run"]["cache_hits"],
        }

    def stage0_pairs(self) -> dict:
        from llavamed.data.synth.pairs import write_caption_pairs

        path = write_caption_pairs(
            self.out / "stage0_pairs",
            self.p.stage0_pairs,
            seed=self.opts.seed,
            workers=self.opts.workers,
            progress=self.opts.progress,
        )
        return {"pairs": self.p.stage0_pairs, "figures": str(path)}

    def stage0(self) -> dict:
        from tqdm import tqdm

        from llavamed.train.vision_pretrain import run_from_config

        cfg = self.cfgs["stage0"]
        res = run_from_config(cfg, [], progress=self.opts.progress)
        info = {"tower": str(res.tower_dir), "report": _small(res.report)}
        if (res.report or {}).get("stopped_early"):
            # The cap is a safety net: cut short, the tower (and every score after it) depends
            # on how busy the machine was, and the run no longer reproduces the documented one.
            info["stopped_early"] = stage0_cap_note(res.report.get("steps"), cfg)
            tqdm.write(f"[quickstart] stage0_vision: {info['stopped_early']}", file=sys.stderr)
        return info

    def stage0b(self) -> dict:
        from llavamed.train.vision_vqa import run_from_config as run_vision_vqa

        res = run_vision_vqa(self.cfgs["stage0b"], progress=self.opts.progress)
        rep = res.report
        return {
            "tower": str(res.tower_dir),
            "steps": rep.get("steps"),
            "val_accuracy": rep.get("val_accuracy"),
            "val_n": rep.get("val_n"),
        }

    def train(self, stage: str) -> dict:
        """Stage 1, stage 2 or fine-tuning: ``llavamed train`` on ``self.cfgs[stage]``."""
        from llavamed.train import run_training

        res = run_training(self.cfgs[stage], progress=self.opts.progress)
        last = res.metrics[-1] if res.metrics else {}
        return {
            "checkpoint": str(res.final_checkpoint),
            "steps": last.get("step"),
            "final_loss": last.get("loss"),
            "train_wall_s": round(res.wall_time_s, 1),
        }

    def evaluate(self, name: str, trained_by: str, ablate: list[str] | None) -> dict:
        """The VQA evaluation ``eval/<name>`` of the checkpoint that stage folder
        ``trained_by`` holds."""
        from llavamed.data.vqa import load_vqa
        from llavamed.eval.report import write_report
        from llavamed.eval.vqa_runner import run_vqa_eval

        samples, load_report = load_vqa(EVAL_DATASET, self.world / "slake", split="test", lang="en")
        result = run_vqa_eval(
            self.out / trained_by / "checkpoint-final",
            samples,
            self.out / "eval" / name,
            batch_size=16,
            ablate=ablate,
            limit=self.p.eval_limit,
            max_new_tokens=16,
            seed=self.opts.seed,
            progress=self.opts.progress,
        )
        write_report(
            result,
            self.out / "eval" / name,
            EVAL_DATASET,
            load_report.to_dict() if hasattr(load_report, "to_dict") else None,
        )
        return {"metrics": _headline(result)}

    def table(self) -> list[Stage]:
        """The stages in order. A stage's settings are part of its key: a comment on a key that
        is no option of its own says which older outputs it makes a new run redo."""
        from llavamed.data.synth.world import GENERATOR_VERSION

        p, seed, given = self.p, self.opts.seed, self.given_tower is not None
        fields = dataclasses.asdict(p)
        stage1_cfg, stage2_cfg, finetune_cfg = (
            self.cfgs["stage1"],
            self.cfgs["stage2"],
            self.cfgs["finetune"],
        )
        # The stage that last trained the tower stage 1 starts from (none: a given tower as is).
        tower_stage = (
            ("stage0b_vision_vqa",) if p.stage0b_steps else () if given else ("stage0_vision",)
        )
        stages = [
            Stage(
                "synth",
                "world",
                self.synth,
                {
                    "articles": p.articles,
                    "image_size": p.image_size,
                    "seed": seed,
                    "vqa_images": p.vqa_images,
                    "train_closed": p.train_closed,
                    # A new renderer changes every image: an upgraded llavamed redoes the world
                    # (and so every stage) rather than report the old one's numbers as its own.
                    "generator": GENERATOR_VERSION,
                },
            ),
            Stage("ingest", "corpus", self.ingest, {}),
            # brief/detailed prompts by caption length since this key: older sets are redone
            Stage(
                "align", "corpus/alignment.json", self.align, {"seed": seed, "prompts": "by-length"}
            ),
            Stage(
                "instruct",
                "corpus/instruct",
                self.instruct,
                # image paths relative to instruct.json since 4086f98: older outputs are redone
                {"n": p.instruct_samples, "seed": seed, "image_paths": "relative"}
                # Only when set: older folders' self-instruct (8 at once) keeps its key.
                | ({"concurrency": 1} if self.opts.deterministic else {}),
                needs=("ingest",),  # the vision stages read none of it: a redo leaves them alone
                # What stage 2 reads of self-instruct's folder (its report and cache change on
                # every retry, the conversations only if a retried figure gets through).
                product="corpus/instruct/instruct.json",
            ),
        ]
        if not given and p.stage0_pairs:
            stages.append(
                Stage(
                    "stage0_pairs",
                    "stage0_pairs",
                    self.stage0_pairs,
                    {"n": p.stage0_pairs, "seed": seed},
                    needs=("synth",),  # its own renders: the synth key carries the generator
                )
            )
        if not given:
            stage0_keys = (
                "vision",
                "stage0_minutes",
                "stage0_steps",
                "stage0_batch",
                "stage0_pairs",
                "probe_images",
            )
            stages.append(
                Stage(
                    "stage0_vision",
                    "stage0",
                    self.stage0,
                    {k: fields[k] for k in stage0_keys},
                    needs=("stage0_pairs",) if p.stage0_pairs else ("ingest",),
                )
            )
        if p.stage0b_steps:
            stages.append(
                Stage(
                    "stage0b_vision_vqa",
                    "stage0b",
                    self.stage0b,
                    {"steps": p.stage0b_steps, "aspect": STAGE0B_ASPECT}
                    | ({"vision_fingerprint": self.given_fp} if given else {}),
                    needs=("synth",) + (() if given else ("stage0_vision",)),
                )
            )
        stages += [
            Stage(
                "stage1_alignment",
                "stage1",
                partial(self.train, "stage1"),
                stage1_cfg | ({"tower_fingerprint": self.given_fp} if self.given_fp else {}),
                needs=("align", *tower_stage),
            ),
            Stage(
                "stage2_instruct",
                "stage2",
                partial(self.train, "stage2"),
                stage2_cfg,
                needs=("stage1_alignment", "instruct"),
            ),
            Stage(
                "eval_zero_shot",
                "eval/zero_shot",
                partial(self.evaluate, "zero_shot", "stage2", None),
                {"limit": p.eval_limit},
            ),
            Stage(
                "finetune_vqa",
                "finetune",
                partial(self.train, "finetune"),
                # group_by_image changed meaning (multi-turn -> shared image prefix): rerun old
                # runs.
                finetune_cfg | {"group_by_image": "shared_prefix"},
                needs=("synth", "stage2_instruct"),  # not the zero-shot evaluation before it
            ),
            Stage(
                "eval_finetuned",
                "eval/finetuned",
                partial(self.evaluate, "finetuned", "finetune", ["blank"]),
                {"limit": p.eval_limit},
            ),
        ]
        return stages


def stage0_cap_note(steps: int | None, cfg: dict) -> str:
    """What to tell a user whose stage 0 stopped at its time cap before its step count."""
    return (
        f"stopped at its {cfg['time_budget_min']:g}-minute safety cap after {steps} of "
        f"{cfg['max_steps']} steps (the machine ran slower than expected: busy?); the tower and "
        "every score after it differ from an uncut run. For the documented numbers, run again "
        "with another --out on an idle machine"
    )


def _small(report: dict | None) -> dict:
    if not report:
        return {}
    return {
        k: v for k, v in report.items() if k in ("retrieval", "probe_summary", "minutes", "steps")
    }
