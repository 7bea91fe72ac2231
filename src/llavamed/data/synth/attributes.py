"""Ground-truth attributes of MedSynth images: one typed dataclass per domain and a sampler.

Every attribute is drawn independently of the others (a finding's presence, its side, its lobe,
the device flags ...), so no attribute can be predicted from another. Attributes that only make
sense when a finding is present (its side, lobe, size) are ``None`` when it is absent. The sampler
always consumes the same number of random draws whatever the values, which keeps the per-image
random streams aligned (useful for counterfactual renders in tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

# Same names as llavamed.data.figures.DOMAINS; the order here is the generation order.
DOMAINS: tuple[str, ...] = ("chest_xray", "ct_scan", "mri", "histology", "gross")

SIDES = ("left", "right")


def _flip(rng: np.random.Generator) -> bool:
    return bool(rng.random() < 0.5)


def _pick(rng: np.random.Generator, options: tuple | list) -> Any:
    return options[int(rng.integers(len(options)))]


@dataclass(frozen=True)
class ChestXrayAttrs:
    """A frontal chest radiograph. Sides are the patient's (patient right = image left)."""

    view: str  # "PA" | "AP"
    consolidation: bool
    consolidation_side: str | None
    consolidation_lobe: str | None  # "upper" | "lower"
    nodule: bool
    nodule_side: str | None
    nodule_lobe: str | None
    nodule_size_mm: int | None
    effusion: bool
    effusion_side: str | None
    cardiomegaly: bool
    ett: bool  # endotracheal tube
    central_line: bool
    central_line_side: str | None
    pacemaker: bool


@dataclass(frozen=True)
class CTAttrs:
    """An axial contrast or non-contrast abdominal CT slice with an optional focal lesion."""

    contrast: bool
    lesion: bool
    organ: str | None  # "liver" | "kidney"
    side: str | None  # liver: right or left lobe; kidney: right or left kidney
    density: str | None  # "hypodense" | "hyperdense"
    size_cm: int | None
    window: str  # "soft tissue" | "liver" (only changes the display window a little)


@dataclass(frozen=True)
class MRIAttrs:
    """An axial brain MRI slice. T1: CSF dark; T2: CSF bright."""

    weighting: str  # "T1" | "T2"
    lesion: bool
    hemisphere: str | None  # "left" | "right" (patient's; radiological convention)
    ring_enhancement: bool | None
    size_cm: int | None


@dataclass(frozen=True)
class HistologyAttrs:
    """An H&E-stained section."""

    tissue: str  # named in captions only; not recoverable from the image
    cellularity: str  # "low" | "high"
    nuclear_atypia: bool
    gland_formation: bool
    inflammation: bool  # inflammatory (lymphocytic) infiltrate
    magnification: int  # 100 | 200 | 400


@dataclass(frozen=True)
class GrossAttrs:
    """A photograph of a resected specimen with a lesion on its cut surface."""

    organ: str  # "kidney" | "liver" | "lung" | "spleen"
    lesion_color: str  # "white" | "yellow" | "red"
    size_cm: float  # lesion diameter; "small" < 3 cm <= "large"
    scale: str  # "ruler" | "scale bar"
    background: str  # "green" | "blue" | "black"


ATTR_CLASSES = {
    "chest_xray": ChestXrayAttrs,
    "ct_scan": CTAttrs,
    "mri": MRIAttrs,
    "histology": HistologyAttrs,
    "gross": GrossAttrs,
}

CT_ORGANS = ("liver", "kidney")
HISTO_TISSUES = ("colon", "breast", "stomach", "prostate", "lung", "skin")
GROSS_ORGANS = ("kidney", "liver", "lung", "spleen")
GROSS_COLORS = ("white", "yellow", "red")


def _sample_chest_xray(rng: np.random.Generator) -> ChestXrayAttrs:
    view = _pick(rng, ("PA", "AP"))
    cons, cons_side, cons_lobe = _flip(rng), _pick(rng, SIDES), _pick(rng, ("upper", "lower"))
    nod, nod_side, nod_lobe = _flip(rng), _pick(rng, SIDES), _pick(rng, ("upper", "lower"))
    nod_size = int(rng.integers(12, 26))
    eff, eff_side = _flip(rng), _pick(rng, SIDES)
    cardio = _flip(rng)
    ett = _flip(rng)
    cvc, cvc_side = _flip(rng), _pick(rng, SIDES)
    pm = _flip(rng)
    return ChestXrayAttrs(
        view=view,
        consolidation=cons,
        consolidation_side=cons_side if cons else None,
        consolidation_lobe=cons_lobe if cons else None,
        nodule=nod,
        nodule_side=nod_side if nod else None,
        nodule_lobe=nod_lobe if nod else None,
        nodule_size_mm=nod_size if nod else None,
        effusion=eff,
        effusion_side=eff_side if eff else None,
        cardiomegaly=cardio,
        ett=ett,
        central_line=cvc,
        central_line_side=cvc_side if cvc else None,
        pacemaker=pm,
    )


def _sample_ct(rng: np.random.Generator) -> CTAttrs:
    contrast = _flip(rng)
    lesion = _flip(rng)
    organ = _pick(rng, CT_ORGANS)
    side = _pick(rng, SIDES)
    density = _pick(rng, ("hypodense", "hyperdense"))
    size = int(rng.integers(2, 6))
    window = _pick(rng, ("soft tissue", "soft tissue", "liver"))
    return CTAttrs(
        contrast=contrast,
        lesion=lesion,
        organ=organ if lesion else None,
        side=side if lesion else None,
        density=density if lesion else None,
        size_cm=size if lesion else None,
        window=window,
    )


def _sample_mri(rng: np.random.Generator) -> MRIAttrs:
    weighting = _pick(rng, ("T1", "T2"))
    lesion = _flip(rng)
    hemi = _pick(rng, SIDES)
    ring = _flip(rng)
    size = int(rng.integers(2, 5))
    return MRIAttrs(
        weighting=weighting,
        lesion=lesion,
        hemisphere=hemi if lesion else None,
        ring_enhancement=ring if lesion else None,
        size_cm=size if lesion else None,
    )


def _sample_histology(rng: np.random.Generator) -> HistologyAttrs:
    return HistologyAttrs(
        tissue=_pick(rng, HISTO_TISSUES),
        cellularity=_pick(rng, ("low", "high")),
        nuclear_atypia=_flip(rng),
        gland_formation=_flip(rng),
        inflammation=_flip(rng),
        magnification=int(_pick(rng, (100, 200, 400))),
    )


def _sample_gross(rng: np.random.Generator) -> GrossAttrs:
    organ = _pick(rng, GROSS_ORGANS)
    color = _pick(rng, GROSS_COLORS)
    # Two well-separated size bands so "larger than 3 cm" is decidable from the image.
    large = _flip(rng)
    size = float(rng.uniform(3.6, 6.0) if large else rng.uniform(1.2, 2.4))
    return GrossAttrs(
        organ=organ,
        lesion_color=color,
        size_cm=round(size, 1),
        scale=_pick(rng, ("ruler", "scale bar")),
        background=_pick(rng, ("green", "blue", "black")),
    )


_SAMPLERS = {
    "chest_xray": _sample_chest_xray,
    "ct_scan": _sample_ct,
    "mri": _sample_mri,
    "histology": _sample_histology,
    "gross": _sample_gross,
}


def sample_attributes(domain: str, rng: np.random.Generator):
    """Draw a ground-truth attribute set for ``domain`` (one of :data:`DOMAINS`)."""
    try:
        return _SAMPLERS[domain](rng)
    except KeyError:
        raise ValueError(f"unknown MedSynth domain {domain!r}; expected one of {DOMAINS}") from None


def attrs_to_dict(attrs) -> dict[str, Any]:
    return dataclasses.asdict(attrs)


def attrs_from_dict(domain: str, data: dict[str, Any]):
    return ATTR_CLASSES[domain](**data)


def domain_of(attrs) -> str:
    for name, cls in ATTR_CLASSES.items():
        if isinstance(attrs, cls):
            return name
    raise TypeError(f"not a MedSynth attribute set: {type(attrs).__name__}")
