"""Samples, dataset loaders and blind-condition images for the GPU tier (no torch here).

Usage::

    from gapcache.extract.data import load_dataset, mean_rgb, derangement, blind_image

    samples = load_dataset("synthetic", split="test", n=200, seed=0)
    samples = load_dataset("manifest", path="data/questions.jsonl")
    samples = load_dataset("chartqa", split="test", path="/data/chartqa", limit=500, shuffle=True)

    image = samples[0].load_image()              # RGB PIL image, or SampleError
    mu = mean_rgb(samples)                       # colour of the blind_mean image
    donors = derangement(len(samples), seed=0)   # blind_randomimage: donors[i] != i
    blank = blind_image("randomimage", image, donor=samples[donors[0]].load_image())

Datasets (``DATASETS``; every loader takes ``split``, ``limit``, ``seed``, ``path``, ``shuffle``):

``synthetic``
    Coloured shapes (circle, square, triangle; decoration only) in a 2x2 grid on a white
    background, drawn from ``seed`` (options ``n=200``, ``image_size=64``, ``kinds``, ``placement``:
    ``"centre"`` near the cell's centre, the default and the shipped model's training data;
    ``"free"`` anywhere in the cell, the data of stores made before the default changed; see ``_draw``). Question
    kinds, each with a closed candidate set and answers balanced up to rounding:
    ``presence`` ("Is there a red shape?", yes/no), ``colour`` ("What colour is the shape?",
    one shape, candidates ``SYNTHETIC_COLOURS``), ``count`` ("How many shapes are there?",
    "1".."4"), all category "hard"; and their text-answerable controls ``presence_text``,
    ``colour_text``, ``count_text`` (the question states the answer, the image agrees), category
    "easy". Splits train/validation/test use disjoint seed streams; ids ``synthetic-000042``
    number the shuffled order.
``manifest``
    JSONL, one object per line: ``id``, ``image`` (path; relative to the manifest's folder),
    ``question``, ``answer`` (string, or list -> ``answers`` with ``answer`` = most common),
    optional ``category``, ``label``, ``candidates``, ``dataset``. A bad line (bad JSON, missing or
    mistyped field, empty question or answer, label inconsistent with candidates) or a
    duplicate id raises DataError naming file and line. Images load lazily: a missing or corrupt
    file is a per-sample SampleError from ``load_image``. ``split`` only labels the samples
    (default "test").
``chartqa`` / ``docvqa`` / ``textvqa`` / ``vqav2`` / ``scienceqa``
    Through the ``datasets`` library. ``path`` is a local copy: a ``save_to_disk`` folder, a
    dataset folder loadable with ``datasets.load_dataset(path)``, or a parquet/arrow/json file.
    Without ``path`` the HF cache is tried with the hub ids below (set ``HF_HUB_OFFLINE=1`` on
    compute nodes); if neither works, DataError says how to fetch a copy. Columns read (the
    first alternative present wins; others ignored):

    ============  ===========================  =============================================
    name          hub id (config)              columns
    ============  ===========================  =============================================
    chartqa       HuggingFaceM4/ChartQA        image, query|question, label|answer|answers,
                                               [human_or_machine -> category human/machine]
    docvqa        lmms-lab/DocVQA (DocVQA)     image, question, answers|answer,
                                               [questionId|question_id], [question_types ->
                                               category = first type]
    textvqa       lmms-lab/textvqa             image, question, answers|answer, [question_id]
    vqav2         lmms-lab/VQAv2               image, question, answers (list of
                                               {answer, ...} or strings), [question_id],
                                               [multiple_choice_answer], [answer_type ->
                                               category yes/no|number|other]
    scienceqa     derek-thomas/ScienceQA       image, question, choices, answer (gold index),
                                               [hint], [subject -> category]
    ============  ===========================  =============================================

    Ids are ``<name>-<question id>``, or ``<name>-<split>-<row index>`` without an id column (the
    row index of the unfiltered split, so ids stay stable under ``limit``/``shuffle``).
    ``answer`` is the most common gold answer (ties: ``multiple_choice_answer`` for VQAv2, else
    the first listed). VQAv2 yes/no questions get candidates ("yes", "no"). ScienceQA keeps
    only rows with an image; its question reads ``Context: <hint>`` (when present), the
    question, and one ``A. <choice>`` line per choice; candidates are the letters ("A", "B",
    ...), ``answer`` the gold letter and ``label`` its index (letters are single tokens, so
    candidate log-probs compare fairly). Rows without a question or a gold answer (e.g. the
    hidden test answers of DocVQA/VQAv2) are skipped with a warning; a split where all are
    skipped raises DataError. Images stay encoded in memory and are decoded by ``load_image``.

``limit`` takes the first N samples, after a permutation from ``seed`` when ``shuffle=True``.

Images: ``Sample.load_image`` applies the EXIF orientation, composites transparency on white
and returns RGB. ``blind_image("randomimage", ...)`` resizes the donor with bicubic resampling
(``PIL.Image.Resampling.BICUBIC``); ``blind_image("mean", ...)`` rounds ``mean_rgb`` half up.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from gapcache.errors import ConfigError, DataError, SampleError, UnknownNameError

__all__ = [
    "BLIND_KINDS",
    "DATASETS",
    "SYNTHETIC_COLOURS",
    "SYNTHETIC_KINDS",
    "Sample",
    "blind_image",
    "feed_image",
    "derangement",
    "load_dataset",
    "mean_of_sums",
    "mean_rgb",
    "pixel_sum",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Sample


@dataclass(frozen=True)
class Sample:
    """One question about one image. Equality and hash ignore the in-memory image."""

    id: str
    question: str
    answer: str
    answers: tuple[str, ...]
    dataset: str
    split: str
    category: str = ""
    label: int = -1
    candidates: tuple[str, ...] = ()
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    image_path: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "answers", tuple(self.answers) or (self.answer,))
        object.__setattr__(self, "candidates", tuple(self.candidates))

    def load_image(self) -> Image.Image:
        """The image as a new RGB PIL image; SampleError when missing, unreadable or corrupt."""
        if self.image is not None:
            try:
                return _to_rgb(_reopen(self.image))
            except Exception as e:
                raise SampleError(self.id, f"in-memory image cannot be decoded: {_why(e)}") from e
        if self.image_path is None:
            raise SampleError(self.id, "has no image (neither image nor image_path is set)")
        return _open_rgb(self.id, self.image_path)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _reopen(im: Image.Image) -> Image.Image:
    """A fresh handle on a lazily opened in-memory file, so that decoding it leaves the
    Sample's image undecoded (datasets of thousands of samples keep only encoded bytes)."""
    fp = getattr(im, "fp", None)
    return Image.open(io.BytesIO(fp.getvalue())) if isinstance(fp, io.BytesIO) else im


#: 16-bit integer modes (PNG 16-bit grayscale): scaled to 8 bits, never clipped (PIL clips to white)
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit(im: Image.Image) -> Image.Image:
    """A grayscale image of more than 8 bits per pixel as mode ``L``, scaled to 0..255.

    ``I;16*``: 0..65535 -> 0..255 (v / 257). ``I`` (32-bit int; Pillow opens some 16-bit PNGs so):
    0..255 kept, up to 65535 scaled as 16 bits, wider scaled by its own maximum. ``F`` (float):
    values in [0, 1] scaled by 255, within [0, 255] kept, wider scaled by the maximum. Negative values
    clip to 0. ``Image.convert`` instead clips every value above 255 to white."""
    a = np.asarray(im).astype(np.float64)
    top = float(a.max()) if a.size else 0.0
    if im.mode.startswith("I;16"):
        scale = 65535.0
    elif im.mode == "F" and top <= 1.0:
        scale = 1.0
    elif top <= 255.0:
        scale = 255.0
    elif im.mode == "I" and top <= 65535.0:
        scale = 65535.0
    else:
        scale = top
    return Image.fromarray(np.clip(np.rint(a * (255.0 / scale)), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    im = ImageOps.exif_transpose(im)
    if im.mode in _WIDE_INT_MODES or im.mode == "F":
        return _to_8bit(im).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def _open_rgb(sample_id: str, path: str) -> Image.Image:
    p = Path(path)
    if p.is_dir():
        raise SampleError(sample_id, f"image path '{p}' is a directory, not an image file")
    if not p.is_file():
        raise SampleError(sample_id, f"image file '{p}' does not exist")
    try:
        with Image.open(p) as im:
            return _to_rgb(im)
    except Exception as e:  # PIL raises many types for bad files
        raise SampleError(sample_id, f"image file '{p}' cannot be read: {_why(e)}") from e


# --------------------------------------------------------------------------------------------
# Registry and common options

Loader = Callable[..., list[Sample]]
DATASETS: dict[str, Loader] = {}


def _register(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return deco


def load_dataset(
    name: str, *, split: str | None = None, limit: int | None = None, seed: int = 0,
    path: str | Path | None = None, **kw: Any,
) -> list[Sample]:
    """Load dataset ``name`` from ``DATASETS`` as a list of Samples (see the module docstring)."""
    if name not in DATASETS:
        raise UnknownNameError("dataset", name, DATASETS)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"The 'limit' parameter of load_dataset must be None or an int >= 0. "
                          f"Got {limit!r} instead.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"The 'seed' parameter of load_dataset must be an int >= 0. "
                          f"Got {seed!r} instead.")
    loader = DATASETS[name]
    known = set(inspect.signature(loader).parameters) - {"split", "limit", "seed", "path"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ConfigError(f"load_dataset({name!r}) got unknown option(s) {', '.join(unknown)}. "
                          f"Supported options: {', '.join(sorted(known)) or 'none'}.")
    return loader(split=split, limit=limit, seed=int(seed), path=path, **kw)


def _order(n: int, *, shuffle: bool, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


def _take(samples: list[Sample], limit: int | None, shuffle: bool, seed: int) -> list[Sample]:
    picked = [samples[i] for i in _order(len(samples), shuffle=shuffle, seed=seed)]
    return picked if limit is None else picked[:limit]


def _most_common(answers: Sequence[str], prefer: str | None = None) -> str:
    counts = Counter(answers)
    top = max(counts.values())
    if prefer is not None and counts.get(prefer) == top:
        return prefer
    return next(a for a in answers if counts[a] == top)


def _check_unique(samples: Iterable[Sample], where: str) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DataError(f"{where}: sample id {s.id!r} occurs more than once; "
                            f"ids must be unique.")
        seen.add(s.id)


# --------------------------------------------------------------------------------------------
# synthetic

SYNTHETIC_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
}
SYNTHETIC_SHAPES = ("circle", "square", "triangle")
SYNTHETIC_KINDS = ("presence", "colour", "count", "presence_text", "colour_text", "count_text")
_BACKGROUND = (255, 255, 255)
_SPLIT_STREAM = {"train": 0, "validation": 1, "test": 2}
_YES_NO = ("yes", "no")
_COUNTS = ("1", "2", "3", "4")


def _kind_candidates(kind: str) -> tuple[str, ...]:
    base = kind.removesuffix("_text")
    return {"presence": _YES_NO, "colour": tuple(SYNTHETIC_COLOURS), "count": _COUNTS}[base]


@_register("synthetic")
def _load_synthetic(
    *, split: str | None = None, limit: int | None = None, seed: int = 0, path: Any = None,
    n: int = 200, image_size: int = 64, kinds: Sequence[str] = SYNTHETIC_KINDS, placement: str = "centre",
    shuffle: bool = False,
) -> list[Sample]:
    split = split or "test"
    _check_synthetic_options(split, path, n, image_size, kinds, placement)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    specs = _synthetic_specs(n, tuple(kinds))
    specs = [specs[i] for i in rng.permutation(len(specs))]
    samples = [_synthetic_sample(i, kind, ans, split, image_size, rng, placement)
               for i, (kind, ans) in enumerate(specs)]
    return _take(samples, limit, shuffle, seed)


def _check_synthetic_options(split, path, n, image_size, kinds, placement) -> None:
    if split not in _SPLIT_STREAM:
        raise ConfigError(f"The 'split' parameter of the synthetic dataset must be one of "
                          f"{', '.join(_SPLIT_STREAM)}. Got {split!r} instead.")
    if path is not None:
        raise ConfigError(f"The synthetic dataset is generated, it takes no 'path'. Got {path!r}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"The 'n' option of the synthetic dataset must be an int >= 1. "
                          f"Got {n!r} instead.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ConfigError(f"The 'image_size' option of the synthetic dataset must be an int >= 16. "
                          f"Got {image_size!r} instead.")
    bad = [k for k in kinds if k not in SYNTHETIC_KINDS]
    if bad or not kinds or isinstance(kinds, str):
        raise ConfigError(f"The 'kinds' option of the synthetic dataset must be a non-empty "
                          f"list of {', '.join(SYNTHETIC_KINDS)}. Got {kinds!r} instead.")
    if placement not in _PLACEMENTS:
        raise ConfigError(f"The 'placement' option of the synthetic dataset must be one of "
                          f"{', '.join(_PLACEMENTS)}. Got {placement!r} instead.")


def _synthetic_specs(n: int, kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    """(kind, answer) pairs: kinds in turn, each kind cycling through its candidates."""
    seen: Counter[str] = Counter()
    specs = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        cands = _kind_candidates(kind)
        specs.append((kind, cands[seen[kind] % len(cands)]))
        seen[kind] += 1
    return specs


_PLACEMENTS = ("centre", "free")


def _draw(colours: list[str], size: int, rng: np.random.Generator, placement: str) -> Image.Image:
    """Shapes in distinct cells of a 2x2 grid, so that they never overlap.

    Side ``d`` in [0.45, 0.8] of the cell. ``free``: anywhere in the cell. ``centre``: the centre
    jittered by at most ``d // 10`` (clamped to the cell), so that every shape covers its cell's
    centre point: at 2x2 patches per cell (the shipped model's 32 px / patch 8) a shape then colours
    exactly its own cell's four patches and "how many shapes" is "coloured patches / 4", which a tiny
    model learns in a few hundred steps (free placement colours 1 to 4 patches a shape)."""
    img = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size // 2
    for colour, c in zip(colours, rng.permutation(4)[: len(colours)]):
        d = int(rng.integers(int(0.45 * cell), int(0.8 * cell) + 1))
        x0, y0 = (c % 2) * cell, (c // 2) * cell
        if placement == "centre":
            j = d // 10
            x0 += int(np.clip((cell - d) // 2 + rng.integers(-j, j + 1), 0, cell - d))
            y0 += int(np.clip((cell - d) // 2 + rng.integers(-j, j + 1), 0, cell - d))
        else:
            x0 += int(rng.integers(0, cell - d + 1))
            y0 += int(rng.integers(0, cell - d + 1))
        box = (x0, y0, x0 + d - 1, y0 + d - 1)
        shape = SYNTHETIC_SHAPES[int(rng.integers(0, len(SYNTHETIC_SHAPES)))]
        fill = SYNTHETIC_COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            apex, bottom = (x0 + (d - 1) / 2, y0), y0 + d - 1
            draw.polygon([apex, (x0, bottom), (x0 + d - 1, bottom)], fill=fill)
    return img


def _presence(answer: str, text: bool, rng: np.random.Generator) -> tuple[list[str], str]:
    names = list(SYNTHETIC_COLOURS)
    asked = names[int(rng.integers(0, len(names)))]
    others = [c for c in names if c != asked]
    colours = [others[j] for j in rng.integers(0, len(others), size=int(rng.integers(1, 4)))]
    if answer == "yes":
        colours[0] = asked
    q = f"Is there a {asked} shape?"
    hint = f"There is {'a' if answer == 'yes' else 'no'} {asked} shape. "
    return colours, (hint + q if text else q)


def _colour(answer: str, text: bool, rng: np.random.Generator) -> tuple[list[str], str]:
    q = "What colour is the shape?"
    return [answer], (f"The shape is {answer}. " + q if text else q)


def _count(answer: str, text: bool, rng: np.random.Generator) -> tuple[list[str], str]:
    names = list(SYNTHETIC_COLOURS)
    colours = [names[j] for j in rng.integers(0, len(names), size=int(answer))]
    q = "How many shapes are there?"
    hint = "There is 1 shape. " if answer == "1" else f"There are {answer} shapes. "
    return colours, (hint + q if text else q)


_SYNTHETIC_BUILDERS = {"presence": _presence, "colour": _colour, "count": _count}


def _synthetic_sample(i: int, kind: str, answer: str, split: str, size: int,
                      rng: np.random.Generator, placement: str) -> Sample:
    text = kind.endswith("_text")
    colours, question = _SYNTHETIC_BUILDERS[kind.removesuffix("_text")](answer, text, rng)
    cands = _kind_candidates(kind)
    return Sample(
        id=f"synthetic-{i:06d}", question=question, answer=answer, answers=(answer,),
        dataset="synthetic", split=split, category="easy" if text else "hard",
        label=cands.index(answer), candidates=cands, image=_draw(colours, size, rng, placement),
    )


# --------------------------------------------------------------------------------------------
# manifest


@_register("manifest")
def _load_manifest(
    *, split: str | None = None, limit: int | None = None, seed: int = 0,
    path: str | Path | None = None, shuffle: bool = False,
) -> list[Sample]:
    if path is None:
        raise ConfigError("The 'path' parameter of load_dataset('manifest') must be a JSONL file. "
                          "Got None instead.")
    file = Path(path)
    if not file.is_file():
        raise DataError(f"Manifest '{file}' does not exist or is not a file.")
    samples, first_line = [], {}
    with file.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{file}:{lineno}: the manifest must be UTF-8 text. Got byte {raw[e.start]:#04x} "
                                f"at column {e.start + 1} instead; re-save the file as UTF-8.") from None
            if not line.strip():
                continue
            s = _manifest_sample(_parse_line(line, file, lineno), file, lineno, split or "test")
            if s.id in first_line:
                raise DataError(f"{file}:{lineno}: duplicate id {s.id!r} (first on line "
                                f"{first_line[s.id]}); ids must be unique.")
            first_line[s.id] = lineno
            samples.append(s)
    if not samples:
        raise DataError(f"Manifest '{file}' holds no samples.")
    return _take(samples, limit, shuffle, seed)


def _parse_line(line: str, file: Path, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{lineno}: invalid JSON ({e.msg} at column {e.colno}).") from e
    if not isinstance(obj, dict):
        raise DataError(f"{file}:{lineno}: each line must be a JSON object. "
                        f"Got {type(obj).__name__}.")
    return obj


def _field_str(obj: dict, key: str, where: str, *, required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{key}'.")
        return None
    value = obj[key]
    if key == "id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string. Got {value!r}.")
    if required and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty.")
    return value


def _field_answers(obj: dict, where: str) -> tuple[str, ...]:
    if "answer" not in obj or obj["answer"] is None:
        raise DataError(f"{where}: missing field 'answer'.")
    value = obj["answer"]
    answers = [value] if isinstance(value, str) else value
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise DataError(f"{where}: field 'answer' must be a non-empty string or a non-empty list "
                        f"of non-empty strings. Got {value!r}.")
    return tuple(answers)


def _field_label(obj: dict, answer: str, where: str) -> tuple[int, tuple[str, ...]]:
    cands = obj.get("candidates") or []
    if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
        raise DataError(f"{where}: field 'candidates' must be a list of strings. Got {cands!r}.")
    label = obj.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < -1):
        raise DataError(f"{where}: field 'label' must be an int >= -1. Got {label!r}.")
    if not cands:
        return (-1 if label is None else label), ()
    if answer not in cands:
        raise DataError(f"{where}: the answer {answer!r} is not among the candidates {cands!r}.")
    if label is not None and label != cands.index(answer):
        raise DataError(f"{where}: field 'label' must be the index of the answer in 'candidates' "
                        f"({cands.index(answer)}). Got {label!r}.")
    return cands.index(answer), tuple(cands)


def _manifest_sample(obj: dict, file: Path, lineno: int, split: str) -> Sample:
    where = f"{file}:{lineno}"
    sid, image, question = (_field_str(obj, k, where) for k in ("id", "image", "question"))
    answers = _field_answers(obj, where)
    answer = _most_common(answers)
    label, cands = _field_label(obj, answer, where)
    image_path = Path(image).expanduser()
    if not image_path.is_absolute():
        image_path = file.parent / image_path
    return Sample(
        id=sid, question=question, answer=answer, answers=answers,
        dataset=_field_str(obj, "dataset", where, required=False) or "manifest", split=split,
        category=_field_str(obj, "category", where, required=False) or "",
        label=label, candidates=cands, image_path=str(image_path),
    )


# --------------------------------------------------------------------------------------------
# Hugging Face datasets


@dataclass(frozen=True)
class _HFSpec:
    name: str
    hub_id: str
    config: str | None
    default_split: str
    required: dict[str, tuple[str, ...]]  # role -> accepted column names, first present wins
    optional: dict[str, tuple[str, ...]]
    # row -> (question, answer, answers, category, label, candidates), None to skip the row
    convert: Callable[[dict], tuple | None]
    image_only: bool = False  # skip rows without an image (ScienceQA: image subset)


def _answers_of(value: Any) -> list[str]:
    """Strings from a str, a list of str, or a list of {'answer': str} (VQAv2)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    items = [a.get("answer") if isinstance(a, dict) else a for a in items]
    return [str(a).strip() for a in items if a is not None and str(a).strip()]


def _qa(r: dict, prefer: str | None = None):
    answers = _answers_of(r["answers"])
    question = (r["question"] or "").strip()
    if not answers or not question:
        return None
    return question, _most_common(answers, prefer), tuple(answers)


def _convert_open(r: dict, category: str = ""):
    qa = _qa(r)
    return None if qa is None else (*qa, category, -1, ())


def _convert_chartqa(r: dict):
    return _convert_open(r, str(r.get("category") or ""))


def _convert_docvqa(r: dict):
    types = r.get("category") or []
    return _convert_open(r, str(types[0]) if len(types) else "")


def _convert_textvqa(r: dict):
    return _convert_open(r)


def _convert_vqav2(r: dict):
    mc = r.get("mc")
    qa = _qa(r, prefer=mc.strip() if isinstance(mc, str) else None)
    if qa is None:
        return None
    atype = r.get("category")
    if qa[1] in _YES_NO and atype in (None, "yes/no"):
        return (*qa, "yes/no", _YES_NO.index(qa[1]), _YES_NO)
    return (*qa, str(atype or ""), -1, ())


def _convert_scienceqa(r: dict):
    choices = [str(c) for c in (r["choices"] or [])]
    gold = r["answer"]
    if not choices or gold is None or not str(gold).strip().lstrip("-").isdigit():
        return None
    gold = int(gold)
    if not 0 <= gold < len(choices) or not (r["question"] or "").strip():
        return None
    letters = tuple(chr(ord("A") + i) for i in range(len(choices)))
    hint = (r.get("hint") or "").strip()
    lines = ([f"Context: {hint}"] if hint else []) + [r["question"].strip()]
    lines += [f"{letter}. {c}" for letter, c in zip(letters, choices)]
    category = str(r.get("category") or "")
    return "\n".join(lines), letters[gold], (letters[gold],), category, gold, letters


_QA = {"image": ("image",), "question": ("question",), "answers": ("answers", "answer")}
_HF_SPECS = {
    s.name: s for s in [
        _HFSpec("chartqa", "HuggingFaceM4/ChartQA", None, "test",
                {"image": ("image",), "question": ("query", "question"),
                 "answers": ("label", "answer", "answers")},
                {"category": ("human_or_machine",)}, _convert_chartqa),
        _HFSpec("docvqa", "lmms-lab/DocVQA", "DocVQA", "validation", _QA,
                {"id": ("questionId", "question_id"), "category": ("question_types",)},
                _convert_docvqa),
        _HFSpec("textvqa", "lmms-lab/textvqa", None, "validation", _QA,
                {"id": ("question_id",)}, _convert_textvqa),
        _HFSpec("vqav2", "lmms-lab/VQAv2", None, "validation",
                {"image": ("image",), "question": ("question",), "answers": ("answers",)},
                {"id": ("question_id",), "mc": ("multiple_choice_answer",),
                 "category": ("answer_type",)}, _convert_vqav2),
        _HFSpec("scienceqa", "derek-thomas/ScienceQA", None, "test",
                {"image": ("image",), "question": ("question",), "choices": ("choices",),
                 "answer": ("answer",)},
                {"hint": ("hint",), "category": ("subject",)}, _convert_scienceqa, image_only=True),
    ]
}


def _fetch_hint(spec: _HFSpec, split: str) -> str:
    cfg = f", {spec.config!r}" if spec.config else ""
    dest = f"/path/{spec.name}"
    return (f"Fetch a local copy on a machine with internet access:\n"
            f"  python -c \"import datasets; datasets.load_dataset('{spec.hub_id}'{cfg}, "
            f"split='{split}').save_to_disk('{dest}')\"\n"
            f"then point gapcache at it: in the config set data.dataset: {spec.name}, data.split: {split}, "
            f"data.path: {dest}  (Python: load_dataset('{spec.name}', split='{split}', path='{dest}')).")


def _open_local(spec: _HFSpec, path: Path, split: str):
    import datasets

    if path.is_file():
        builder = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json",
                   ".csv": "csv"}.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{spec.name}: cannot read '{path}': expected a save_to_disk folder, "
                            f"a dataset folder or a .parquet/.arrow/.json/.jsonl/.csv file.")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    if spec.config:
        try:
            return datasets.load_dataset(str(path), spec.config, split=split)
        except Exception:  # the copy may not have the hub's config layout; try plain
            pass
    return datasets.load_dataset(str(path), split=split)


def _open_hf(spec: _HFSpec, split: str, path: str | Path | None):
    """A datasets.Dataset of the split, from the local copy or the HF cache."""
    import datasets

    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"{spec.name}: local copy '{p}' does not exist. "
                            f"{_fetch_hint(spec, split)}")
        try:
            obj = _open_local(spec, p, split)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{spec.name}: cannot load the local copy '{p}' (split {split!r}): "
                            f"{_why(e)}. {_fetch_hint(spec, split)}") from e
    else:
        try:
            obj = datasets.load_dataset(spec.hub_id, spec.config, split=split)
        except Exception as e:
            raise DataError(f"{spec.name}: no path given and '{spec.hub_id}' (split {split!r}) is "
                            f"not in the Hugging Face cache ({_why(e)}). "
                            f"{_fetch_hint(spec, split)}") from e
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f"{spec.name}: the copy at '{path}' has no split {split!r}. "
                            f"Its splits: {', '.join(obj)}.")
        obj = obj[split]
    return obj


def _resolve_columns(spec: _HFSpec, columns: list[str], where: str) -> dict[str, str]:
    found = {}
    for role, alts in {**spec.required, **spec.optional}.items():
        name = next((c for c in alts if c in columns), None)
        if name is None and role in spec.required:
            raise DataError(f"{spec.name}: {where} has no {role} column (expected one of "
                            f"{', '.join(alts)}). Its columns: {', '.join(columns)}.")
        if name is not None:
            found[role] = name
    return found


def _hf_rows(spec: _HFSpec, ds, cols: dict[str, str], *, shuffle: bool, seed: int):
    """Yield (row index, {role: value}) in the requested order, images left encoded."""
    import datasets

    if isinstance(ds.features.get(cols["image"]), datasets.Image):
        ds = ds.cast_column(cols["image"], datasets.Image(decode=False))
    indices = np.arange(len(ds))
    if spec.image_only:
        indices = indices[_has_value(ds, cols["image"])]
    indices = indices[_order(len(indices), shuffle=shuffle, seed=seed)]
    names = {name: role for role, name in cols.items()}
    labels = _class_labels(ds, cols.get("category"))
    for idx, row in zip(indices, ds.select_columns(list(names)).select(indices)):
        r = {names[k]: v for k, v in row.items()}
        if labels is not None and isinstance(r.get("category"), int):
            r["category"] = labels[r["category"]]
        yield int(idx), r


def _has_value(ds, column: str) -> np.ndarray:
    table = ds.select_columns([column]).with_format("arrow")
    chunks = [~batch[column].is_null().to_numpy(zero_copy_only=False)
              for batch in table.iter(batch_size=4096)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=bool)


def _class_labels(ds, column: str | None):
    import datasets

    feature = ds.features.get(column) if column else None
    return feature.names if isinstance(feature, datasets.ClassLabel) else None


def _hf_image(value: Any) -> tuple[Image.Image | None, str | None]:
    """An undecoded HF image cell -> (lazily opened PIL image, or a path)."""
    if isinstance(value, Image.Image):
        return value, None
    if isinstance(value, str):
        return None, value
    if isinstance(value, dict):
        if value.get("bytes"):
            try:
                return Image.open(io.BytesIO(value["bytes"])), None
            except Exception as e:
                log.warning("undecodable image bytes (%s); load_image will fail", _why(e))
                return None, None
        return None, value.get("path")
    return None, None


def _load_hf(spec: _HFSpec, *, split, limit, seed, path, shuffle) -> list[Sample]:
    split = split or spec.default_split
    ds = _open_hf(spec, split, path)
    cols = _resolve_columns(spec, list(ds.column_names), f"the copy at '{path or spec.hub_id}'")
    samples, skipped = [], 0
    for idx, r in _hf_rows(spec, ds, cols, shuffle=shuffle, seed=seed):
        if limit is not None and len(samples) >= limit:
            break
        fields = spec.convert(r)
        if fields is None:
            skipped += 1
            continue
        samples.append(_hf_sample(spec, split, idx, r, fields))
    _report_skipped(spec, split, skipped, samples)
    _check_unique(samples, f"{spec.name} split {split!r}")
    return samples


def _hf_sample(spec: _HFSpec, split: str, idx: int, r: dict, fields: tuple) -> Sample:
    question, answer, answers, category, label, cands = fields
    raw_id = r.get("id")
    sid = f"{spec.name}-{raw_id}" if raw_id not in (None, "") else f"{spec.name}-{split}-{idx:06d}"
    image, image_path = _hf_image(r["image"])
    return Sample(id=sid, question=question, answer=answer, answers=answers, dataset=spec.name,
                  split=split, category=category, label=label, candidates=cands,
                  image=image, image_path=image_path)


def _report_skipped(spec: _HFSpec, split: str, skipped: int, samples: list[Sample]) -> None:
    if skipped and not samples:
        raise DataError(f"{spec.name}: no usable sample in split {split!r}: all {skipped} rows "
                        f"read lack a question or a gold answer (test splits often hide their "
                        f"answers; try split='validation').")
    if skipped:
        log.warning("%s split %r: skipped %d rows without a question or a gold answer",
                    spec.name, split, skipped)


def _make_hf_loader(spec: _HFSpec) -> Loader:
    def loader(*, split: str | None = None, limit: int | None = None, seed: int = 0,
               path: str | Path | None = None, shuffle: bool = False) -> list[Sample]:
        return _load_hf(spec, split=split, limit=limit, seed=seed, path=path, shuffle=shuffle)

    loader.__name__ = f"_load_{spec.name}"
    loader.__doc__ = f"{spec.name} via datasets (hub id {spec.hub_id}); see the module docstring."
    return loader


for _spec in _HF_SPECS.values():
    _register(_spec.name)(_make_hf_loader(_spec))


# --------------------------------------------------------------------------------------------
# blind conditions


def pixel_sum(image: Image.Image) -> tuple[np.ndarray, int]:
    """(per-channel sum as int64 (3,), number of pixels) of an RGB image: what ``mean_rgb`` adds up."""
    pixels = np.asarray(image, dtype=np.uint8).reshape(-1, 3)
    return pixels.sum(axis=0, dtype=np.int64), int(pixels.shape[0])


def mean_of_sums(sums: Iterable[tuple[np.ndarray, int]], failed: int = 0) -> tuple[float, float, float]:
    """Pixel-weighted mean RGB from ``pixel_sum`` values (exact: integer sums, one division)."""
    total, count = np.zeros(3, dtype=np.int64), 0
    for channel_sum, n in sums:
        total += channel_sum
        count += n
    if count == 0:
        raise DataError(f"mean_rgb: no loadable image among the samples ({failed} failed).")
    r, g, b = (float(v) / count for v in total)
    return r, g, b


def mean_rgb(samples: Iterable[Sample]) -> tuple[float, float, float]:
    """Pixel-weighted mean RGB (0-255) over every pixel of every loadable image."""
    sums, failed = [], 0
    for s in samples:
        try:
            sums.append(pixel_sum(s.load_image()))
        except SampleError as e:
            failed += 1
            log.warning("mean_rgb skips %s", e)
    return mean_of_sums(sums, failed)


def derangement(n: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of range(n) with perm[i] != i for all i, from ``seed``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ConfigError(f"The 'n' parameter of derangement must be an int >= 2 (a derangement of "
                          f"fewer than 2 items does not exist). Got {n!r} instead.")
    rng = np.random.default_rng(seed)
    identity = np.arange(n)
    while True:  # rejection sampling: accepted with probability ~1/e
        perm = rng.permutation(n)
        if not np.any(perm == identity):
            return perm


def _black(original: Image.Image, mean_rgb, donor) -> Image.Image:
    return Image.new("RGB", original.size, (0, 0, 0))


def _uniform_mean(original: Image.Image, mean_rgb, donor) -> Image.Image:
    return Image.new("RGB", original.size, _mean_colour(mean_rgb))


def _donor_resized(original: Image.Image, mean_rgb, donor) -> Image.Image:
    if donor is None:
        raise ConfigError("blind_image('randomimage') needs a donor image. Got donor=None.")
    rgb = _to_rgb(donor)
    return rgb if rgb.size == original.size else rgb.resize(original.size, Image.Resampling.BICUBIC)


#: the blind images by kind: ``(original, mean_rgb, donor) -> RGB image of original's size``
BLIND_FEEDS = {"black": _black, "mean": _uniform_mean, "randomimage": _donor_resized}
BLIND_KINDS = tuple(BLIND_FEEDS)
#: every image a condition can feed (the keys of ``gapcache.conditions.IMAGES``)
IMAGE_FEEDS = {"original": lambda original, mean_rgb, donor: original, **BLIND_FEEDS}


def blind_image(kind: str, original: Image.Image, *, mean_rgb: Sequence[float] | None = None,
                donor: Image.Image | None = None) -> Image.Image:
    """The image of a blind condition, RGB and of ``original``'s size.

    ``black``: all zeros. ``mean``: uniform ``mean_rgb``, each channel rounded half up.
    ``randomimage``: ``donor`` in RGB, resized with ``PIL.Image.Resampling.BICUBIC``.
    """
    if kind not in BLIND_FEEDS:
        raise UnknownNameError("blind image kind", kind, BLIND_KINDS)
    return BLIND_FEEDS[kind](original, mean_rgb, donor)


def feed_image(kind: str, original: Image.Image, *, mean_rgb: Sequence[float] | None = None,
               donor: Image.Image | None = None) -> Image.Image:
    """The image a condition feeds (``kind``: its ``image_kind``): ``original`` itself, or ``blind_image``."""
    if kind not in IMAGE_FEEDS:
        raise UnknownNameError("condition image", kind, IMAGE_FEEDS)
    return IMAGE_FEEDS[kind](original, mean_rgb, donor)


def _mean_colour(value: Sequence[float] | None) -> tuple[int, int, int]:
    try:
        channels = [float(v) for v in value]  # type: ignore[union-attr]
    except TypeError:
        channels = []
    if len(channels) != 3 or not all(math.isfinite(v) and 0 <= v <= 255 for v in channels):
        raise ConfigError(f"The 'mean_rgb' parameter of blind_image('mean') must be 3 numbers in "
                          f"[0, 255]. Got {value!r} instead.")
    r, g, b = (int(math.floor(v + 0.5)) for v in channels)
    return r, g, b
