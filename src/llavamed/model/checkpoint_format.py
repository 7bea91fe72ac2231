"""What a llavamed checkpoint is on disk, in one place: the metadata file, the names its weights
are written under, the rewrites that let older readers load it, and what a model folder must be
for us to read it. Both writers (``compose.save_checkpoint`` and the converters'
``native_writer``) and the reader (``checkpoint``) take these facts from here.

Imports nothing from ``llavamed.model``, so every module of the package can import it at the top.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from llavamed.errors import InputError, first_line

# --- The folder ------------------------------------------------------------------------------

CHECKPOINT_META = "llavamed.json"
"""llavamed's own record beside transformers' files: format, template, spec, training."""
FORMAT = "llavamed-native-llava/1"

LLAVA_HF_TOWERS = ("clip_vision_model", "siglip_vision_model")
"""Vision towers of the llava-hf layout: the ones vLLM's and SGLang's llava build (besides
Pixtral); a ViT tower loads in transformers only."""


def write_meta(folder: Path, fields: dict) -> None:
    """Write ``llavamed.json`` in ``folder``: the format id, then ``fields`` in their order."""
    meta = {"format": FORMAT, **fields}
    (Path(folder) / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n")


def is_checkpoint_dir(path: Path) -> bool:
    """A folder llavamed wrote as a checkpoint (so a new one may replace it)."""
    return (Path(path) / CHECKPOINT_META).is_file()


def is_untrained_checkpoint(path: Path) -> bool:
    """A checkpoint ``model init`` or ``convert`` may replace: one llavamed wrote that records
    no training. ``model init --out`` or ``convert ... DST`` naming a run's checkpoint-final
    replaced hours of training without a word; the trainer itself replaces its own."""
    if not is_checkpoint_dir(path):
        return False
    try:
        meta = json.loads((Path(path) / CHECKPOINT_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "train" not in meta


# --- Weight names ----------------------------------------------------------------------------

SAVED_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.", "vision_tower."),
)
"""transformers' in-memory names of a llava model's four parts -> the names it saves them under."""


def llava_hf_key(key: str, vision_type: str) -> str:
    """``key``, as transformers 5 saves it, under the llava-hf layout that transformers 4.x, vLLM
    and SGLang expect: CLIP/SigLIP tower weights go under ``vision_tower.vision_model.*``
    (transformers 5 saves them without the ``vision_model`` level but maps that prefix back on
    load, so both generations read the file). Every other key is returned as it is."""
    tower = "vision_tower."
    if (
        vision_type in LLAVA_HF_TOWERS
        and key.startswith(tower)
        and not key.startswith(tower + "vision_model.")
    ):
        return tower + "vision_model." + key[len(tower) :]
    return key


def disk_key(key: str, vision_type: str) -> str:
    """The on-disk name of an in-memory key; ``KeyError`` for a key outside the four parts."""
    for mem, saved in SAVED_PREFIXES:
        if key.startswith(mem):
            return llava_hf_key(saved + key[len(mem) :], vision_type)
    raise KeyError(key)


# --- Rewrites for older readers ----------------------------------------------------------------


def add_legacy_rope_theta(folder: Path) -> None:
    """Also write ``text_config.rope_theta`` beside transformers 5's ``rope_parameters``.
    Readers built on transformers 4.x (vLLM, SGLang, older scripts) look only for the flat key
    and, not finding it, silently use 10,000 instead of SmolLM2's 1e5 or Mistral's 1e6:
    every logit shifts. transformers 5 reads the flat key as the same value.

    Likewise ``rope_scaling`` for a scaled RoPE (Llama 3's ``llama3``, ``yarn``, ``linear``
    ...): transformers 5 writes no ``rope_scaling`` beside the scaling it keeps in
    ``rope_parameters``, so those readers ran a Llama-3.x LM with unscaled rotary frequencies."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config") or {}
    params = text.get("rope_parameters") or {}
    changed = False
    theta = params.get("rope_theta")
    if theta is not None and "rope_theta" not in text:
        text["rope_theta"] = theta
        changed = True
    if params.get("rope_type") not in (None, "default") and not text.get("rope_scaling"):
        text["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        changed = True
    if changed:
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def legacy_tokenizer_config(folder: Path) -> None:
    """Rewrite ``tokenizer_config.json`` so that transformers 4.x (vLLM, SGLang, older scripts)
    loads the tokenizer too. transformers 5 writes added special tokens as a list
    ``extra_special_tokens``, which 4.x reads as a dict (AttributeError on ``.keys()``), and names
    the class ``TokenizersBackend``, which 4.x does not know (ValueError). The list goes into
    ``additional_special_tokens`` (merged, no duplicates) and the class becomes 4.x's name for
    it, ``PreTrainedTokenizerFast``; transformers 5 reads both back as the same tokenizer."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    extra = cfg.get("extra_special_tokens")
    changed = False
    if isinstance(extra, list):
        merged = list(cfg.get("additional_special_tokens") or [])
        merged += [t for t in extra if t not in merged]
        cfg["additional_special_tokens"] = merged
        del cfg["extra_special_tokens"]
        changed = True
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        changed = True
    if changed:
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def vllm_tower_warning(folder: Path) -> str | None:
    """Why vLLM cannot serve the checkpoint in ``folder``, or None: its llava builds CLIP, SigLIP
    and Pixtral towers and stops on any other with "Unsupported vision config"."""
    vision = json.loads((Path(folder) / "config.json").read_text()).get("vision_config") or {}
    kind = vision.get("model_type")
    if kind in LLAVA_HF_TOWERS:
        return None
    return (
        f"{folder}: the vision tower (model_type={kind}) loads in transformers; vLLM's llava "
        "supports CLIP and SigLIP towers only"
    )


# --- Reading a model folder --------------------------------------------------------------------


@contextlib.contextmanager
def model_files(path: str | Path) -> Iterator[None]:
    """Turn what transformers, tokenizers and safetensors raise on a damaged or incomplete model
    folder (a truncated ``model.safetensors``, a cut ``tokenizer.json``, a missing weights file)
    into one :class:`InputError` naming the folder and the library's first line of reason."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except InputError:
        raise
    except StrictDataclassError as exc:
        # A config.json field of the wrong type ("hidden_size": "32") was a traceback; the
        # message's first line names the field, the second what was wrong with it.
        raise InputError(path, "invalid model config", config_error_reason(exc)) from exc
    except (OSError, ValueError, SafetensorError) as exc:
        first = first_line(exc)
        what = "corrupt weights file" if isinstance(exc, SafetensorError) else "unreadable model"
        raise InputError(path, what, first) from exc


def config_error_reason(exc: BaseException) -> str:
    """A transformers config validation error in one line (it spreads over two)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] or type(exc).__name__


CONVERT_ORIGINAL_HINT = (
    "this is the original LLaVA format: convert it first with "
    "'llavamed convert llava-med SRC DST' (LLaVA-Med v1.5, llava_mistral)"
)


def is_original_llava_type(model_type) -> bool:
    """``llava_mistral``, ``llava_llama``, ...: the LLaVA repo's own classes, which transformers
    cannot load (their LM fields are flat, the projector is ``mm_projector``)."""
    return isinstance(model_type, str) and model_type.startswith("llava_")


def _check_model_type(cls, path: str | Path) -> None:
    """Refuse a folder whose config.json names another model type than ``cls`` builds.
    transformers would build ``cls``'s default config instead: for an original LLaVA-Med folder
    (``llava_mistral``, flat LM fields) a Llama-7B-sized LlavaForConditionalGeneration, which
    took 24 GB before its weights were found not to fit (the machine killed it first)."""
    want = getattr(getattr(cls, "config_class", None), "model_type", None)
    if not want:
        return  # an Auto class: transformers picks the model from the config
    cfg_path = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # transformers names what is missing
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(cfg_path, "unreadable model config", first_line(exc)) from exc
    if not isinstance(cfg, dict):
        raise InputError(cfg_path, "unreadable model config", "not a JSON object")
    got = cfg.get("model_type")
    if got == want:
        return
    hint = f"; {CONVERT_ORIGINAL_HINT}" if is_original_llava_type(got) else ""
    raise InputError(path, f"not a {want} checkpoint", f"model_type={got!r} in config.json{hint}")


def _check_generation_config(path: str | Path) -> None:
    """transformers falls back to defaults built from config.json, without a word, when
    generation_config.json cannot be parsed: the checkpoint's stop ids and sampling settings
    would be lost and the model served, evaluated or trained on as if it had none."""
    gen_path = Path(path) / "generation_config.json"
    try:
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # optional: a checkpoint without one generates with transformers' defaults
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(gen_path, "unreadable generation config", first_line(exc)) from exc
    if not isinstance(gen, dict):
        raise InputError(gen_path, "unreadable generation config", "not a JSON object")


def strict_from_pretrained(cls, path: str | Path, **kwargs):
    """``cls.from_pretrained(path, **kwargs)`` that refuses a checkpoint whose weights do not fit
    the model. transformers fills a missing weight with random values and only prints a load
    report, so a checkpoint without its projector would be served, evaluated or fine-tuned with
    a random one."""
    _check_model_type(cls, path)
    _check_generation_config(path)
    # ignore_mismatched_sizes: a wrong shape is then listed with the other keys (and refused
    # below) instead of ending in transformers' RuntimeError after its printed report.
    model, info = cls.from_pretrained(
        path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
    )
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:3])}{more}")
    if problems:
        raise InputError(path, "checkpoint does not fit the model", "; ".join(problems))
    return model
