"""The quickstart's size presets (``--size tiny|small|medium``: world size, stage steps,
reference stage times for the ETA) and its command-line options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llavamed.errors import ConfigError

# Stage 0b trains the tower on the geometry the composed LLaVA feeds it (ModelSpec's default aspect);
# part of the stage's key, so a folder from a version that squashed images re-runs it.
STAGE0B_ASPECT = "pad"
EVAL_DATASET = "slake"  # MedSynth's SLAKE-shaped set: the largest, with en and zh questions


@dataclass(frozen=True)
class SizePreset:
    """Knobs of one quickstart size. Times are what they cost on 2 CPU cores."""

    articles: int
    """MedSynth articles (about 2.7 figures each)."""
    image_size: int
    instruct_samples: int
    """Figures sent to the local LLM for self-instruct conversations."""
    lm_layers: int | None
    """Keep the first N SmolLM2 layers (None = all 30)."""
    vision: str
    stage0_minutes: float
    stage0_steps: int
    stage0_batch: int
    probe_images: int
    """MedSynth images per domain for stage 0's linear-probe table (0 = skip the probes)."""
    stage1_steps: int
    stage2_epochs: float
    finetune_epochs: float
    eval_limit: int | None
    """Questions in each VQA evaluation (None = the whole test split)."""
    vqa_images: int | None = None
    """MedSynth VQA images (None = 10 per article)."""
    train_closed: int = 3
    """Most yes/no questions per train-split VQA image (3 = the real sets' shape)."""
    stage0_pairs: int = 0
    """Rendered single-panel MedSynth caption pairs that stage 0 trains on (a PMC-15M stand-in);
    0 trains on the ingested corpus's figures instead."""
    stage0b_steps: int = 0
    """Steps of stage 0b (the tower learns the VQA train split's yes/no questions); 0 skips it."""
    batch: int = 16
    compile_finetune: bool = False
    """Fine-tune with the LM's decoder layers compiled (``train.compile``)."""
    lr_finetune: float = 2e-4
    lr_projector_finetune: float | None = None
    lr_vision_finetune: float | None = None
    lr_stage1: float = 2e-3
    """Stage 1's projector learning rate. With an LM cut to a few layers the caption loss stays
    near 10 nats, and at 2e-3 its gradients wash out what a fresh projector passes on: probes of
    the projector's output read the devices at 0.78-0.81 after stage 1 against 0.96-1.00 before
    it (benchmarks/readout_trace.py, docs/stage0.md)."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each stage took in a reference run on the 2-core machine; the total ETA scales
    them by how fast this machine runs the stages already finished."""


SIZES: dict[str, SizePreset] = {
    # A few minutes end to end: exercises every stage (tests, smoke checks); learns little.
    "tiny": SizePreset(
        articles=8,
        image_size=128,
        instruct_samples=6,
        lm_layers=2,
        vision="cpu",
        stage0_minutes=0.3,
        stage0_steps=4,
        stage0_batch=8,
        stage0_pairs=48,
        probe_images=0,
        stage1_steps=4,
        stage2_epochs=1.0,
        finetune_epochs=1.0,
        eval_limit=24,
        batch=8,
        stage0b_steps=5,
        # Measured on the idle 2-core Zen 3 machine (about 100 s in all, 2026-12-06; `quickstart
        # --size tiny --out DIR` from an empty DIR, embedded-LM cache warm).
        stage_seconds={
            "synth": 1,
            "ingest": 0,
            "align": 0,
            "instruct": 67,
            "stage0_pairs": 1,
            "stage0_vision": 3,
            "stage0b_vision_vqa": 4,
            "stage1_alignment": 7,
            "stage2_instruct": 8,
            "eval_zero_shot": 1,
            "finetune_vqa": 8,
            "eval_finetuned": 2,
        },
    ),
    "small": SizePreset(
        articles=150,
        image_size=192,
        # 12 self-instruct figures (24 cost 93 s of the 20-minute budget; the fine-tuned
        # model's VQA scores do not use them).
        instruct_samples=12,
        # 8 layers: 4 layers fine-tune in 0.62x the time but score 1.2 / 2.2 points lower by
        # yes/no logits on all 1,669 closed test questions (78.4 / 79.7 against 79.6 / 81.9,
        # same world and towers, fp32 on an AVX2 CPU, 2026-11-22).
        lm_layers=8,
        # 32 px patches (16 image tokens): from this world's 2,600 VQA train images the tower
        # learns the findings better than with 16 px patches (stage 0b held out 0.873 against
        # 0.818, in 80 s against 230 s), and each fine-tuning step is cheaper.
        vision="cpu-p32",
        # Stage 0 on 12,000 rendered single-panel pairs for 900 steps (run F in docs/stage0.md):
        # local findings +6.7 / +18.2 points over a random tower (patch / pooled probes), and
        # stage 0b from this tower reaches 0.899 held out against 0.848 from 150 steps on the
        # corpus's 390 figures. The final model: 84.4% against 80.6% by yes/no logits on all
        # 1,669 closed test questions, 85.6% against 77.9% strict (AVX2 CPU, fp32). It costs
        # 7.4 minutes there (rendering 1, stage 0 6.5) against 1.
        # A safety cap, not the budget: the 900 steps train for 10.5 minutes on an idle 2-core
        # Zen 1 EPYC, and a cap that cut them short under load would make the tower (and every
        # score after it) depend on the machine.
        stage0_minutes=30.0,
        stage0_steps=900,
        stage0_batch=64,
        stage0_pairs=12000,
        probe_images=0,
        stage1_steps=30,
        stage2_epochs=1.0,
        # Two epochs with the LM's layers compiled: by yes/no logits on all 1,669 closed test
        # questions, 86.2 / 90.1 (SLAKE- / VQA-RAD-shaped) against 87.0 / 89.8 for the three
        # eager epochs of the earlier recipe, from the same stage-2 checkpoint, in 371 s against
        # 767 (bf16 on a 2-core AMX Xeon, 2026-12-06; docs/measurements.md). Before the 12,000-
        # pair stage 0 and stage 0b's 900 steps, a third epoch was worth 1-2 points (77.1 / 81.9
        # against 75.9 / 79.5 after 1.9 epochs; fp32, AVX2 CPU).
        finetune_epochs=2.0,
        compile_finetune=True,
        eval_limit=400,
        # 4,500 VQA images with dense train questions: MedSynth makes them in ~30 s, and each
        # training step sees more yes/no answers per image forward.
        vqa_images=4500,
        train_closed=12,
        # The final model's closed accuracy tracks the stage-0b tower's own (held out: 0.725 after
        # 300 steps, 0.818 after 900, 0.805 after 1,500 as it starts to memorise). Final models,
        # yes/no logits on all 1,669 closed test questions: 65.8 and 67.0 (two runs) after 300
        # steps, 69.8 after 900, 71.3 after 1,500 (docs/stage0.md, "The tower is the ceiling").
        stage0b_steps=900,
        lr_stage1=2e-4,
        lr_finetune=5e-4,
        # Below the LM's rate: at 2e-3 fine-tuning washed the devices out of the projector
        # (probes 0.69-0.81); 2e-4 lifted the blank-image gap from 21.6 to 26.9 (docs/stage0.md).
        lr_projector_finetune=2e-4,
        lr_vision_finetune=0,
        # Not the top 2 LM layers alone (train.frozen_lm_layers=6 with the projector frozen and
        # train.cache_frozen_layers): 2.8x fewer fine-tuning seconds by
        # benchmarks/frozen_layers.py (1,587 s on a 2-core Zen 1 EPYC), but strict closed
        # accuracy fell from 85.6% to 70.2% on the same towers, and to 73.6% with the top 4
        # layers trained (docs/measurements.md, "Training only the top of the LM").
        # Fresh clone of 288054d on an idle 2-core Intel Xeon with AMX (bf16), 2026-12-06:
        # 19 min 16 s in all, 18 min 18 s after set-up, 89.4% strict closed, 40.9 points over a
        # blank image (docs/measurements.md). The 3-epoch eager recipe before it took 44 min 5 s
        # after set-up on an idle 2-core Zen 3 EPYC (AVX2, fp32), fine-tuning 1,711 s of it.
        stage_seconds={
            "synth": 25,
            "ingest": 1,
            "align": 0,
            "instruct": 73,
            "stage0_pairs": 38,
            "stage0_vision": 284,
            "stage0b_vision_vqa": 176,
            "stage1_alignment": 34,
            "stage2_instruct": 8,
            "eval_zero_shot": 21,
            "finetune_vqa": 416,
            "eval_finetuned": 19,
        },
    ),
    "medium": SizePreset(
        # The small recipe with twice the VQA images and three times the stage-0b steps, which
        # together lift the stage-0b tower (held out 0.954 against small's 0.899). The LM keeps
        # small's 8 layers. Fresh clone of 8ae7d98 on an idle 2-core AVX2-only CPU (fp32,
        # 2026-11-23): 1 h 50 min; 87.1% [85.5, 88.6] strict closed on all 1,802 closed test
        # questions, 50.6% with a blank image (82.0% before the 12,000-pair stage 0, 78.9% with
        # the cpu tower, 76.4% before shared-prefix packing).
        articles=400,
        image_size=256,
        instruct_samples=96,
        lm_layers=8,
        vision="cpu-p32",  # as small (its comment)
        # small's stage 0 (its comment).
        stage0_minutes=30.0,
        stage0_steps=900,
        stage0_batch=64,
        stage0_pairs=12000,
        probe_images=150,
        stage1_steps=80,
        stage2_epochs=2.0,
        finetune_epochs=2.0,
        eval_limit=None,
        vqa_images=9000,
        train_closed=12,
        stage0b_steps=2700,
        lr_stage1=2e-4,
        lr_finetune=5e-4,
        # Below the LM's rate: at 2e-3 fine-tuning washed the devices out of the projector
        # (probes 0.69-0.81); 2e-4 lifted the blank-image gap from 21.6 to 26.9 (docs/stage0.md).
        lr_projector_finetune=2e-4,
        lr_vision_finetune=0,
        # The fresh-clone run above (AVX2, fp32; docs/measurements.md, the older `--size medium`).
        stage_seconds={
            "synth": 125,
            "ingest": 3,
            "align": 0,
            "instruct": 1063,
            "stage0_pairs": 64,
            "stage0_vision": 423,
            "stage0b_vision_vqa": 654,
            "stage1_alignment": 223,
            "stage2_instruct": 420,
            "eval_zero_shot": 311,
            "finetune_vqa": 3058,
            "eval_finetuned": 277,
        },
    ),
}


@dataclass
class QuickstartOptions:
    out: Path = Path("quickstart_out")
    size: str = "small"
    seed: int = 0
    workers: int = 2
    progress: bool = True
    vision: Path | None = None
    """A pretrained vision tower folder (stage 0's ``vision_tower/``, a converted BiomedCLIP ...):
    stage 0 is skipped and stage 0b, stage 1 and the rest start from this tower."""
    deterministic: bool = False
    """Self-instruct sends its requests one at a time (``--deterministic``): the local server
    batches concurrent requests as they arrive, and in bf16 a request's logits depend on its
    batch, so sampled conversations differ between runs; one at a time they repeat exactly."""

    @property
    def instruct_concurrency(self) -> int:
        return 1 if self.deterministic else 8

    def preset(self) -> SizePreset:
        if self.size not in SIZES:
            raise ConfigError(f"--size {self.size!r}: choose from {', '.join(SIZES)}")
        return SIZES[self.size]

    def check_vision(self) -> Path | None:
        if self.vision is None:
            return None
        # `--vision=~/x` (no shell expands a ~ after =) is the home folder's, as in configs.
        tower = Path(self.vision).expanduser().resolve()
        if not (tower / "config.json").is_file():
            raise ConfigError(
                f"--vision {self.vision}: not a vision tower folder (no config.json); give the "
                "vision_tower/ folder that stage 0 or `llavamed convert biomedclip` wrote"
            )
        return tower
