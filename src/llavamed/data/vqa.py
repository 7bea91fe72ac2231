"""Loaders for the medical VQA sets in the shapes people actually hold (DESIGN.md §3).

Every loader returns ``(samples, report)``: typed :class:`VQASample` records and a
:class:`LoadReport` counting the records it had to skip, per reason. A bad record never stops a
load; an unreadable *file* raises :class:`InputError`.

* VQA-RAD public JSON + image folder (``VQA_RAD Dataset Public.json``, ``VQA_RAD Image Folder/``);
  the split lives in ``phrase_type``: values starting with "test" are test, the rest train.
* SLAKE (Slake1.0): ``train.json`` / ``validate.json`` / ``test.json`` + ``imgs/``; ``q_lang``.
* PathVQA's original release: ``pvqa/qas/<split>/<split>_qa.pkl`` (a pickled list of
  ``{"image": "val_0261", "question", "answer"}``) + ``pvqa/images/<split>/<image>.jpg``, the
  splits on disk being train, val and test. The pickles are read as data only: one that names any
  class or function is refused, never run.
* Parquet exports of PathVQA and VQA-RAD (columns ``image`` (bytes or {bytes, path}),
  ``question``, ``answer``), a single file or a folder of ``<split>-*.parquet`` files.
* LLaVA-Med's converted ``test.json`` (``id``, ``image``, ``answer_type``, ``conversations``).

``answer_type`` comes from the data; only when a record has none do yes/no answers count as
closed and everything else as open.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from llavamed.errors import InputError, first_line, format_counts
from llavamed.utils.io import parse_records, read_json

DATASETS = ("vqa-rad", "slake", "pathvqa", "llava-med")
VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
SLAKE_SPLITS = {
    "train": "train",
    "val": "validate",
    "validate": "validate",
    "validation": "validate",
    "test": "test",
}


def file_split(path: Path) -> str | None:
    """The split a file's name says it holds (``test.json``, ``validation-00000-of-00002.parquet``
    -> "validate", PathVQA's ``val_qa.pkl`` -> "validate"), or None when the name is not a
    split's."""
    return SLAKE_SPLITS.get(path.stem.split("-")[0].removesuffix("_qa"))


def _check_file_split(path: Path, split: str) -> None:
    """A split file given directly must be the requested split: scoring a train file as the test
    split gives numbers that look right and mean nothing."""
    named = file_split(path)
    if split != "all" and named is not None and named != SLAKE_SPLITS.get(split, split):
        raise InputError(
            path, "file holds another split", f"its name says {named!r}, --split asks {split!r}"
        )


@dataclass
class VQASample:
    """One question about one image, whatever file it came from."""

    qid: str
    image: str | bytes  # a file path, or the encoded image bytes (parquet exports)
    question: str
    answer: str
    answer_type: Literal["closed", "open"]
    question_type: str = ""
    lang: str = "en"
    split: str = "test"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_key(self) -> str:
        """A short identity of the image, to tell questions about the same image apart."""
        if isinstance(self.image, bytes):
            import hashlib

            return "sha1:" + hashlib.sha1(self.image).hexdigest()
        return str(self.image)


@dataclass
class LoadReport:
    """What a loader read and what it skipped (per reason, with the first few messages)."""

    source: str
    n_records: int = 0
    n_loaded: int = 0
    n_other_split: int = 0  # valid records of another split or language, not an error
    n_answer_type_inferred: int = 0  # loaded samples without answer_type: yes/no -> closed
    bad: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    # Answers files and scores are keyed by question id, so a second question with an id already
    # loaded would be scored against the first one's answer: it is skipped and counted instead.
    _qids: set[str] = field(default_factory=set, repr=False)

    def add_bad(self, err: InputError) -> None:
        self.bad[err.reason] += 1
        if len(self.examples) < 20:
            self.examples.append(str(err))

    def read(
        self, records: list, where: str | Path, parse: Callable[[dict, str], VQASample | None]
    ) -> list[VQASample]:
        """Parse every record with ``parse(record, src)``, which returns a sample, or None for a
        valid record of another split or language. A record it rejects with InputError is
        counted by reason and skipped, so one bad record never stops a load."""

        def parse_unique(rec: dict, src: str) -> VQASample | None:
            sample = parse(rec, src)
            if sample is not None:
                if sample.qid in self._qids:
                    raise InputError(
                        src,
                        "duplicate question id",
                        f"id {sample.qid} is already used by an earlier record",
                    )
                self._qids.add(sample.qid)
                if not str(rec.get("answer_type") or "").strip():  # _answer_type inferred it
                    self.n_answer_type_inferred += 1
            return sample

        parsed = parse_records(records, where, parse_unique, self.add_bad)
        samples = [s for s in parsed if s is not None]
        self.n_records += len(records)
        self.n_other_split += len(parsed) - len(samples)
        self.n_loaded += len(samples)
        return samples

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "n_records": self.n_records,
            "n_loaded": self.n_loaded,
            "n_other_split": self.n_other_split,
            "n_answer_type_inferred": self.n_answer_type_inferred,
            "bad": dict(self.bad),
            "examples": list(self.examples),
        }

    def summary(self) -> str:
        s = f"{self.source}: {self.n_loaded} samples loaded of {self.n_records} records"
        if self.n_other_split:
            s += f", {self.n_other_split} in other splits/languages"
        if self.bad:
            s += "; skipped " + format_counts(self.bad)
        return s


# --- field helpers ---------------------------------------------------------------------------


def _text_field(rec: dict, key: str, src: str, *, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise InputError(src, f"missing field {key}")
        return ""
    v = rec[key]
    # Numbers are legitimate answers ("2" lesions); VQA-RAD stores some as JSON numbers.
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise InputError(src, f"wrong type for {key}", f"got {type(v).__name__}")
    v = str(v).strip()
    if required and not v:
        raise InputError(src, f"empty field {key}")
    return v


def infer_answer_type(answer: str) -> Literal["closed", "open"]:
    """The fallback when the data has no answer_type: yes/no answers are closed."""
    from llavamed.eval.metrics import is_yes_no

    return "closed" if is_yes_no(answer) else "open"


def _answer_type(rec: dict, answer: str, src: str) -> Literal["closed", "open"]:
    raw = rec.get("answer_type")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return infer_answer_type(answer)
    if not isinstance(raw, str):
        raise InputError(src, "wrong type for answer_type", f"got {type(raw).__name__}")
    v = raw.strip().lower()
    if v not in ("open", "closed"):
        raise InputError(src, "unknown answer_type", repr(raw))
    return v  # type: ignore[return-value]


def _image_path(folder: Path, name: str, src: str) -> str:
    p = folder / name
    try:
        found = p.is_file()
    except OSError as exc:
        # is_file() raises rather than answering False for a name over the file system's limit
        # (ENAMETOOLONG: a base64 image pasted where its file name belongs) or a folder it may not
        # search (EACCES): one bad record, counted like any other missing image.
        shown = str(p) if len(str(p)) <= 200 else str(p)[:200] + "..."
        raise InputError(src, "missing image", f"{shown}: {exc.strerror or exc}") from exc
    if not found:
        raise InputError(src, "missing image", str(p))
    return str(p)


def _load_list(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(path, "expected a JSON list of records")
    return data


def _default_qids(rows: list, prefix: str) -> list:
    """Records without ``qid``/``id`` get ``<prefix>:<index in the file>``, an id that is the same
    on every run (answers files are keyed by it, so a resume finds them again)."""
    return [
        {**r, "qid": f"{prefix}:{i}"}
        if isinstance(r, dict) and r.get("qid", r.get("id")) is None
        else r
        for i, r in enumerate(rows)
    ]


def _field_sample(
    rec: dict,
    src: str,
    *,
    qid: str,
    image_of: Callable[[], str | bytes],
    split: str,
    type_field: str = "question_type",
    **more: Any,
) -> VQASample:
    """A sample of a record whose question and answer are its ``question`` and ``answer`` fields
    (VQA-RAD, SLAKE, parquet, PathVQA's pickles), checked in that order, then the image
    (``image_of()``); ``type_field`` names its question-type field; ``more``: ``lang``,
    ``extra``."""
    question = _text_field(rec, "question", src)
    answer = _text_field(rec, "answer", src)
    atype = _answer_type(rec, answer, src)
    qtype = rec.get(type_field)
    return VQASample(
        qid=qid,
        image=image_of(),
        question=question,
        answer=answer,
        answer_type=atype,
        question_type=str(qtype).strip() if qtype is not None else "",
        split=split,
        **more,
    )


def _plain_sample(
    image_of: Callable[[dict, str], str | bytes], split: str, dataset: str, rec: dict, src: str
) -> VQASample:
    """A record with ``question``, ``answer`` and an image (``image_of(rec, src)``), optional
    ``answer_type``/``question_type``, and a ``qid``/``id`` (see :func:`_default_qids`)."""
    return _field_sample(
        rec,
        src,
        qid=str(rec.get("qid", rec.get("id"))),
        image_of=lambda: image_of(rec, src),
        split=split,
        extra={"dataset": dataset},
    )


# --- VQA-RAD public JSON ---------------------------------------------------------------------


def _find_vqa_rad(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        js = path / VQA_RAD_JSON
        if not js.is_file():
            cands = sorted(p for p in path.glob("*.json"))
            if len(cands) != 1:
                raise InputError(
                    path, "no VQA-RAD JSON", f"expected {VQA_RAD_JSON!r} in the folder"
                )
            js = cands[0]
    else:
        js = path
    images = js.parent / VQA_RAD_IMAGES
    return js, images if images.is_dir() else js.parent


def load_vqa_rad(
    path: str | os.PathLike, split: str = "test"
) -> tuple[list[VQASample], LoadReport]:
    """VQA-RAD's public JSON (or its parquet export). ``split``: test, train or all."""
    path = Path(path)
    if split not in ("test", "train", "all"):
        # "val" kept none of the records, silently: an evaluation of nothing, a training source
        # that added nothing.
        raise InputError(
            path, "unknown VQA-RAD split", f"{split!r}; use train or test (it has no validation)"
        )
    if _parquet_files(path, split):
        return load_parquet(path, split=split, dataset="vqa-rad")
    js, images = _find_vqa_rad(path)

    def parse(rec: dict, src: str) -> VQASample | None:
        phrase = rec.get("phrase_type")
        rec_split = "test" if isinstance(phrase, str) and phrase.startswith("test") else "train"
        if split != "all" and rec_split != split:
            return None
        return _field_sample(
            rec,
            src,
            qid=_text_field(rec, "qid", src),
            image_of=lambda: _image_path(images, _text_field(rec, "image_name", src), src),
            split=rec_split,
            extra={k: rec[k] for k in ("phrase_type", "image_organ") if k in rec},
        )

    report = LoadReport(str(js))
    return report.read(_load_list(js), js, parse), report


# --- SLAKE ---------------------------------------------------------------------------------


def load_slake(
    path: str | os.PathLike, split: str = "test", lang: str = "en"
) -> tuple[list[VQASample], LoadReport]:
    """SLAKE's folder (``<split>.json`` + ``imgs/``) or one of its split files.

    ``lang``: "en" (the paper's comparison), "zh" or "all". ``split="all"`` on the folder reads
    train, validate and test, each sample keeping its own split."""
    path = Path(path)
    if path.is_dir() and split == "all":
        names = [n for n in ("train", "validate", "test") if (path / f"{n}.json").is_file()]
        if not names:
            raise InputError(path, "file not found", "no train/validate/test.json")
        samples, report = [], LoadReport(str(path))
        for n in names:
            samples += _read_slake(path / f"{n}.json", lang, report)
        return samples, report
    if path.is_dir():
        if split not in SLAKE_SPLITS:
            raise InputError(path, "unknown SLAKE split", f"{split!r}; use train, validate or test")
        js = path / f"{SLAKE_SPLITS[split]}.json"
        if not js.is_file():
            raise InputError(js, "file not found")
    else:
        js = path
        _check_file_split(js, split)
    report = LoadReport(str(js))
    return _read_slake(js, lang, report), report


def _read_slake(js: Path, lang: str, report: LoadReport) -> list[VQASample]:
    images = js.parent / "imgs"
    if not images.is_dir():
        images = js.parent
    split_name = SLAKE_SPLITS.get(js.stem, js.stem)

    def parse(rec: dict, src: str) -> VQASample | None:
        q_lang = _text_field(rec, "q_lang", src, required=False) or "en"
        if lang != "all" and q_lang != lang:
            return None
        return _field_sample(
            rec,
            src,
            qid=_text_field(rec, "qid", src),
            image_of=lambda: _image_path(images, _text_field(rec, "img_name", src), src),
            split=split_name,
            type_field="content_type",
            lang=q_lang,
            extra={k: rec[k] for k in ("img_id", "modality", "location", "base_type") if k in rec},
        )

    return report.read(_load_list(js), js, parse)


# --- parquet (PathVQA, VQA-RAD exports) ----------------------------------------------------


def _parquet_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        if path.suffix != ".parquet":
            return []
        _check_file_split(path, split)
        return [path]
    if not path.is_dir():
        return []
    files = sorted(path.rglob("*.parquet"))
    if split != "all":
        # Hugging Face exports name shards "<split>-00000-of-00001-<hash>.parquet" (PathVQA's
        # dev shards "validation-...": the aliases of SLAKE_SPLITS apply).
        want = SLAKE_SPLITS.get(split, split)
        files = [f for f in files if (file_split(f) or f.stem.split("-")[0]) == want]
    return files


def _image_bytes(rec: dict, src: str) -> bytes:
    v = rec.get("image")
    if isinstance(v, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        v = v.get("bytes")
    if isinstance(v, bytearray | memoryview):
        v = bytes(v)
    if v is None:
        raise InputError(src, "missing image")
    if not isinstance(v, bytes):
        raise InputError(src, "wrong type for image", f"got {type(v).__name__}")
    if not v:
        raise InputError(src, "missing image", "empty bytes")
    return v


def load_parquet(
    path: str | os.PathLike, split: str = "test", dataset: str = "pathvqa"
) -> tuple[list[VQASample], LoadReport]:
    """Parquet with columns ``image``, ``question``, ``answer`` (+ optional ``answer_type``,
    ``question_type``, ``qid``/``id``); ``path`` is a file or a folder of split-named shards."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = _parquet_files(path, split)
    if not files:
        raise InputError(path, "no parquet files", f"for split {split!r}")
    report = LoadReport(str(path))
    samples = []
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise InputError(f, "unreadable parquet", str(exc)) from exc
        missing = {"image", "question", "answer"} - set(table.column_names)
        if missing:
            raise InputError(f, "missing columns", ", ".join(sorted(missing)))
        # A file's own name says its split when it names one ("all" mixes several).
        shard_split = file_split(f) or (split if split != "all" else f.stem.split("-")[0])
        rows = _default_qids(table.to_pylist(), f.stem)  # no id column: shard and row name it
        samples += report.read(rows, f, partial(_plain_sample, _image_bytes, shard_split, dataset))
    return samples, report


# --- PathVQA's original release (pickles + JPEG folders) -------------------------------------

PATHVQA_DIRS = {"train": "train", "validate": "val", "test": "test"}  # split -> folder on disk


class _DataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (lists, dicts, strings, numbers...). A pickle is a program: any
    global it names (a class, a function such as ``os.system``) is refused before it is looked
    up, so nothing in the file runs."""

    def __init__(self, file: io.BytesIO, path: Path, encoding: str):
        super().__init__(file, encoding=encoding)
        self._path = path

    def find_class(self, module: str, name: str):
        raise InputError(
            self._path,
            "pickle holds code",
            f"refusing to load {module}.{name} from a pickle; only plain data is read",
        )


def read_data_pickle(path: Path) -> Any:
    """A pickle file's plain data through :class:`_DataUnpickler`; a missing, truncated or
    corrupt file, or one naming any global, is an :class:`InputError` naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(path, "file not found") from exc
    except OSError as exc:
        raise InputError(path, "unreadable file", first_line(exc)) from exc

    def load(encoding: str) -> Any:
        buf = io.BytesIO(data)
        obj = _DataUnpickler(buf, path, encoding).load()
        if buf.read(1):
            raise pickle.UnpicklingError("data after the end of the pickle")
        return obj

    try:
        # ``encoding`` only applies to Python 2 ``str`` objects (PathVQA's release is of that
        # age); Python 3 pickles store text as UTF-8 whatever it says. UTF-8 first: it is right
        # for ASCII and UTF-8 text and fails rather than garbling anything else. A Python 2
        # string that is not UTF-8 was written in a one-byte code page, most likely Latin-1,
        # which decodes any byte, so it is the fallback (not "bytes": the fields must be text).
        try:
            return load("utf-8")
        except UnicodeDecodeError:
            return load("latin1")
    except InputError:
        raise
    except Exception as exc:  # truncated or corrupt: EOFError, UnpicklingError, ValueError...
        raise InputError(path, "unreadable pickle", first_line(exc)) from exc


def _load_pickled_records(path: Path) -> list:
    data = read_data_pickle(path)
    if not isinstance(data, list):
        raise InputError(path, "expected a pickled list of records", f"got {type(data).__name__}")
    if data and not any(isinstance(r, dict) for r in data):
        raise InputError(
            path, "expected a pickled list of records", f"got a list of {type(data[0]).__name__}"
        )
    return data


def _pathvqa_qas(path: Path) -> Path | None:
    """The ``qas`` folder of PathVQA's release when ``path`` is the release folder (``pvqa/``) or
    that ``qas`` folder itself, else None."""
    if not path.is_dir():
        return None
    if (path / "qas").is_dir():
        return path / "qas"
    if any((path / d / f"{d}_qa.pkl").is_file() for d in PATHVQA_DIRS.values()):
        return path
    return None


def _pathvqa_images(pkl: Path, images: str | os.PathLike | None) -> Path:
    """The image folder of ``pvqa/qas/<d>/<d>_qa.pkl``: ``pvqa/images/<d>/``. ``images``, when
    given, is the release's ``images/`` folder (its ``<d>/`` subfolder is used when present) or
    the split's image folder itself."""
    if len(pkl.parents) < 3:
        pkl = pkl.absolute()
    sub = pkl.parent.name
    if images is None:
        folder = pkl.parents[2] / "images" / sub
    else:
        folder = Path(images) / sub if (Path(images) / sub).is_dir() else Path(images)
    if not folder.is_dir():
        raise InputError(
            pkl, "no image folder", f"expected {folder}; --images names the release's images/"
        )
    return folder


def load_pathvqa(
    path: str | os.PathLike, split: str = "test", images: str | os.PathLike | None = None
) -> tuple[list[VQASample], LoadReport]:
    """PathVQA's original release: the ``pvqa/`` folder (or its ``qas/`` folder), or one
    ``qas/<d>/<d>_qa.pkl`` file, whose name must then say ``split``. ``split``: train,
    val/validate/validation, test, or all (every split present). The records have no
    answer_type, so yes/no answers count as closed; they have no id either, so a question's id
    is ``<split>:<index in its pickle>``."""
    path = Path(path)
    if path.is_file():
        _check_file_split(path, split)
        named = file_split(path) or (SLAKE_SPLITS.get(split, split) if split != "all" else None)
        files = [(named or path.stem, path)]
    else:
        qas = _pathvqa_qas(path)
        if qas is None:
            raise InputError(path, "no PathVQA qas folder", "expected qas/<split>/<split>_qa.pkl")
        pkls = {s: qas / d / f"{d}_qa.pkl" for s, d in PATHVQA_DIRS.items()}
        if split == "all":
            files = [(s, p) for s, p in pkls.items() if p.is_file()]
            if not files:
                raise InputError(qas, "file not found", "no train/val/test _qa.pkl")
        elif split not in SLAKE_SPLITS:
            raise InputError(path, "unknown PathVQA split", f"{split!r}; use train, val or test")
        else:
            files = [(SLAKE_SPLITS[split], pkls[SLAKE_SPLITS[split]])]
            if not files[0][1].is_file():
                raise InputError(files[0][1], "file not found")
    report = LoadReport(str(path))
    samples = []
    for name, pkl in files:
        folder = _pathvqa_images(pkl, images)

        def image_of(rec: dict, src: str, folder: Path = folder) -> str:
            image = _text_field(rec, "image", src)  # "val_0261": the file is val_0261.jpg
            return _image_path(folder, image if Path(image).suffix else f"{image}.jpg", src)

        records = _default_qids(_load_pickled_records(pkl), name)
        samples += report.read(records, pkl, partial(_plain_sample, image_of, name, "pathvqa"))
    return samples, report


# --- LLaVA-Med's converted test.json -------------------------------------------------------


def load_llava_med(
    path: str | os.PathLike, images: str | os.PathLike | None = None, split: str = "test"
) -> tuple[list[VQASample], LoadReport]:
    """LLaVA-Med's ``test.json``; images resolve against ``images`` (default: the JSON's folder,
    or its ``images/`` subfolder when that exists)."""
    path = Path(path)
    if path.is_dir() and split == "all":
        raise InputError(path, "no 'all' split", "LLaVA-Med ships one file per split: --split test")
    js = path / f"{split}.json" if path.is_dir() else path
    if not path.is_dir():
        _check_file_split(js, split)
        split = file_split(js) or split
    if images is None:
        images = js.parent / "images" if (js.parent / "images").is_dir() else js.parent
    images = Path(images)

    def parse(rec: dict, src: str) -> VQASample:
        qid = _text_field(rec, "id", src)
        # LLaVA-Med's own evaluator also accepts this misspelling found in its files.
        conv = rec.get("conversations", rec.get("conversatons"))
        if conv is None:
            raise InputError(src, "missing field conversations")
        if (
            not isinstance(conv, list)
            or len(conv) < 2
            or not all(isinstance(t, dict) for t in conv[:2])
        ):
            raise InputError(src, "wrong type for conversations", "need a human and a gpt turn")
        question = _text_field(conv[0], "value", src).replace("<image>", "").strip()
        answer = _text_field(conv[1], "value", src)
        if not question:
            raise InputError(src, "empty field question")
        atype = _answer_type(rec, answer, src)
        image = _image_path(images, _text_field(rec, "image", src), src)
        return VQASample(
            qid=qid,
            image=image,
            question=question,
            answer=answer,
            answer_type=atype,
            question_type=str(rec.get("question_type") or "").strip(),
            split=split,
        )

    report = LoadReport(str(js))
    return report.read(_load_list(js), js, parse), report


def load_vqa(
    dataset: str,
    path: str | os.PathLike,
    split: str = "test",
    lang: str = "en",
    images: str | os.PathLike | None = None,
) -> tuple[list[VQASample], LoadReport]:
    """Dispatch on ``dataset`` (one of :data:`DATASETS`). PathVQA: its original release (a
    ``.pkl`` file, or a folder holding ``qas/``) or a parquet export; ``images`` serves
    LLaVA-Med's test.json and PathVQA's pickles."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if dataset == "vqa-rad":
        return load_vqa_rad(path, split=split)
    if dataset == "slake":
        return load_slake(path, split=split, lang=lang)
    if dataset == "pathvqa":
        if (path.is_file() and path.suffix == ".pkl") or _pathvqa_qas(path) is not None:
            return load_pathvqa(path, split=split, images=images)
        return load_parquet(path, split=split, dataset="pathvqa")
    if dataset == "llava-med":
        return load_llava_med(path, images=images, split=split)
    raise InputError(dataset, "unknown dataset", f"choose from {', '.join(DATASETS)}")
