"""Tests of gapcache.extract.data: offline, fast, no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from gapcache.errors import ConfigError, DataError, SampleError, UnknownNameError  # noqa: E402
from gapcache.extract import data as D  # noqa: E402
from gapcache.extract.data import (  # noqa: E402
    Sample, blind_image, derangement, load_dataset, mean_rgb,
)


def _pixels(img: Image.Image) -> bytes:
    return img.convert("RGB").tobytes()


def _colours(img: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in px) for px in np.asarray(img).reshape(-1, 3)}


def _solid(colour, size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, colour)


# --------------------------------------------------------------------------------------------
# Sample, registry


def test_module_does_not_import_torch():
    code = "import sys, gapcache.extract.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sample_equality_ignores_image_and_is_hashable():
    a = Sample("x", "q?", "yes", ["yes"], "d", "test", candidates=["yes", "no"], label=0,
               image=_solid((1, 2, 3)))
    b = Sample("x", "q?", "yes", ("yes",), "d", "test", candidates=("yes", "no"), label=0,
               image=_solid((9, 9, 9)))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert Sample("y", "q", "a", (), "d", "s").answers == ("a",)


def test_sample_without_image_fails_per_sample():
    with pytest.raises(SampleError, match="no image"):
        Sample("x", "q", "a", ("a",), "d", "s").load_image()


def test_load_image_rgba_composited_on_white():
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    img = Sample("x", "q", "a", ("a",), "d", "s", image=rgba).load_image()
    assert img.mode == "RGB" and _colours(img) == {(255, 255, 255)}


def test_in_memory_encoded_image_decoded_per_call_and_corrupt_fails():
    import io

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG")
    good = Sample("g", "q", "a", ("a",), "d", "s", image=Image.open(io.BytesIO(buf.getvalue())))
    assert _pixels(good.load_image()) == _pixels(good.load_image())
    assert good.load_image().size == (32, 32)
    cut = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))
    with pytest.raises(SampleError, match="in-memory image cannot be decoded"):
        Sample("c", "q", "a", ("a",), "d", "s", image=cut).load_image()


def test_unknown_dataset_and_bad_options():
    with pytest.raises(UnknownNameError, match="Supported datasets: .*synthetic"):
        load_dataset("nope")
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset("synthetic", colours=3)
    with pytest.raises(ConfigError, match="limit"):
        load_dataset("synthetic", limit=-1)
    with pytest.raises(ConfigError, match="split"):
        load_dataset("synthetic", split="dev")
    assert set(D.DATASETS) == {"synthetic", "manifest", "chartqa", "docvqa", "textvqa", "vqav2",
                               "scienceqa"}


# --------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic():
    a = load_dataset("synthetic", n=48, seed=3)
    b = load_dataset("synthetic", n=48, seed=3)
    assert [s.id for s in a] == [s.id for s in b] == [f"synthetic-{i:06d}" for i in range(48)]
    assert [s.question for s in a] == [s.question for s in b]
    assert a == b
    assert [_pixels(s.load_image()) for s in a] == [_pixels(s.load_image()) for s in b]
    c = load_dataset("synthetic", n=48, seed=4)
    assert [_pixels(s.load_image()) for s in a] != [_pixels(s.load_image()) for s in c]


def test_synthetic_balanced_and_labels_consistent():
    samples = load_dataset("synthetic", n=240, seed=0, image_size=32)
    assert all(s.load_image().size == (32, 32) for s in samples[:5])
    by_kind: dict[tuple, Counter] = {}
    for s in samples:
        assert s.label == s.candidates.index(s.answer)
        assert s.answers == (s.answer,) and s.dataset == "synthetic" and s.split == "test"
        assert s.category in ("hard", "easy")
        by_kind.setdefault((s.candidates, s.category), Counter())[s.answer] += 1
    assert len(by_kind) == 6  # 3 question kinds x (hard, easy)
    for counts in by_kind.values():
        assert len(set(counts.values())) == 1, counts  # 240 = 6 kinds x 40: exactly balanced
    cats = Counter(s.category for s in samples)
    assert cats["hard"] == cats["easy"] == 120


def test_synthetic_questions_match_images():
    for s in load_dataset("synthetic", n=60, seed=1, kinds=("presence", "colour", "count")):
        img = s.load_image()
        present = {name for name, rgb in D.SYNTHETIC_COLOURS.items()
                   if rgb in _colours(img)}
        if s.question.startswith("Is there"):
            asked = s.question.split()[3]
            assert (asked in present) == (s.answer == "yes")
        elif s.question.startswith("What colour"):
            assert present == {s.answer}
        assert s.category == "hard"


def test_synthetic_text_controls_give_the_answer_away():
    for s in load_dataset("synthetic", n=30, kinds=("colour_text", "count_text", "presence_text")):
        statement = s.question.split(". ")[0]
        assert s.category == "easy"
        if s.candidates == ("yes", "no"):
            assert statement.startswith("There is a " if s.answer == "yes" else "There is no ")
        else:
            assert s.answer in statement.split()


def test_synthetic_splits_disjoint():
    train = load_dataset("synthetic", split="train", n=100)
    test = load_dataset("synthetic", split="test", n=100)
    assert all(s.split == "train" for s in train)
    assert not {_pixels(s.load_image()) for s in train} & {_pixels(s.load_image()) for s in test}


def test_synthetic_limit_and_shuffle():
    full = load_dataset("synthetic", n=20)
    assert load_dataset("synthetic", n=20, limit=5) == full[:5]
    shuffled = load_dataset("synthetic", n=20, shuffle=True, seed=0)
    assert sorted(s.id for s in shuffled) == sorted(s.id for s in full)


# --------------------------------------------------------------------------------------------
# manifest


def _write_manifest(tmp_path: Path, rows, name="m.jsonl") -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture
def img_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _solid((10, 20, 30), (4, 4)).save(d / "a.png")
    _solid((200, 100, 0), (2, 2)).save(d / "b.png")
    return d


def test_manifest_good(tmp_path, img_dir):
    p = _write_manifest(tmp_path, [
        {"id": "a", "image": "imgs/a.png", "question": "Colour?", "answer": "blue",
         "candidates": ["red", "blue"], "category": "hard"},
        "",
        {"id": "b", "image": str(img_dir / "b.png"), "question": "Q?",
         "answer": ["x", "y", "y"], "label": 3},
    ])
    a, b = load_dataset("manifest", path=p, split="val")
    assert (a.id, a.answer, a.label, a.candidates, a.category, a.split) == \
        ("a", "blue", 1, ("red", "blue"), "hard", "val")
    assert a.image_path == str(tmp_path / "imgs" / "a.png")
    assert a.load_image().getpixel((0, 0)) == (10, 20, 30)
    assert (b.answer, b.answers, b.label, b.candidates) == ("y", ("x", "y", "y"), 3, ())
    assert load_dataset("manifest", path=p, split="val", limit=1) == [a]


@pytest.mark.parametrize("row, match", [
    ({"image": "a.png", "question": "q", "answer": "a"}, "missing field 'id'"),
    ({"id": "1", "question": "q", "answer": "a"}, "missing field 'image'"),
    ({"id": "1", "image": "a.png", "answer": "a"}, "missing field 'question'"),
    ({"id": "1", "image": "a.png", "question": "q"}, "missing field 'answer'"),
    ({"id": "1", "image": "a.png", "question": "  ", "answer": "a"}, "'question' is empty"),
    ({"id": "1", "image": "a.png", "question": "q", "answer": []}, "field 'answer'"),
    ({"id": "1", "image": 5, "question": "q", "answer": "a"}, "'image' must be a string"),
    ({"id": "1", "image": "a.png", "question": "q", "answer": "a", "candidates": ["b"]},
     "not among the candidates"),
    ({"id": "1", "image": "a.png", "question": "q", "answer": "a", "candidates": ["b", "a"],
      "label": 0}, "'label' must be the index"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_manifest_bad_line(tmp_path, row, match):
    good = {"id": "0", "image": "a.png", "question": "q", "answer": "a"}
    p = _write_manifest(tmp_path, [good, row])
    with pytest.raises(DataError, match=match) as info:
        load_dataset("manifest", path=p)
    assert f"{p}:2" in str(info.value)


def test_manifest_duplicate_id(tmp_path):
    row = {"id": "same", "image": "a.png", "question": "q", "answer": "a"}
    p = _write_manifest(tmp_path, [row, row])
    with pytest.raises(DataError, match=r"m.jsonl:2: duplicate id 'same' \(first on line 1\)"):
        load_dataset("manifest", path=p)


def test_manifest_missing_file_and_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("manifest", path=tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="path"):
        load_dataset("manifest")
    with pytest.raises(DataError, match="no samples"):
        load_dataset("manifest", path=_write_manifest(tmp_path, ["", ""]))


def test_manifest_missing_and_corrupt_images_fail_per_sample(tmp_path, img_dir):
    (img_dir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = Image.new("RGB", (64, 64), (1, 2, 3))
    good.save(img_dir / "trunc.jpg")
    data = (img_dir / "trunc.jpg").read_bytes()
    (img_dir / "trunc.jpg").write_bytes(data[: len(data) // 2])
    p = _write_manifest(tmp_path, [
        {"id": "gone", "image": "imgs/gone.png", "question": "q", "answer": "a"},
        {"id": "bad", "image": "imgs/bad.png", "question": "q", "answer": "a"},
        {"id": "trunc", "image": "imgs/trunc.jpg", "question": "q", "answer": "a"},
    ])
    gone, bad, trunc = load_dataset("manifest", path=p)
    for s, reason in [(gone, "does not exist"), (bad, "cannot be read"), (trunc, "cannot be read")]:
        with pytest.raises(SampleError, match=reason) as info:
            s.load_image()
        assert info.value.sample_id == s.id and s.image_path in str(info.value)


# --------------------------------------------------------------------------------------------
# Hugging Face loaders on fake local copies


def _imgs(n, size=(6, 4)):
    return [_solid((10 * i, 5, 7), size) for i in range(n)]


def _save(tmp_path, name, columns, features=None, split=None):
    import datasets

    ds = datasets.Dataset.from_dict(columns, features=features)
    if split:
        ds = datasets.DatasetDict({split: ds, "train": ds.select([0])})
    out = tmp_path / name
    ds.save_to_disk(str(out))
    return out


def test_chartqa_fake_copy(tmp_path):
    import datasets

    feats = datasets.Features({
        "image": datasets.Image(), "query": datasets.Value("string"),
        "label": datasets.Sequence(datasets.Value("string")),
        "human_or_machine": datasets.ClassLabel(names=["human", "machine"]),
    })
    path = _save(tmp_path, "chartqa", {
        "image": _imgs(3), "query": ["What is A?", "What is B?", "Max?"],
        "label": [["12"], ["Yes"], ["7.5"]], "human_or_machine": [0, 1, 0],
    }, feats, split="test")
    samples = load_dataset("chartqa", path=path)
    assert [s.id for s in samples] == ["chartqa-test-000000", "chartqa-test-000001",
                                       "chartqa-test-000002"]
    s = samples[1]
    assert (s.question, s.answer, s.answers, s.category, s.dataset, s.split) == \
        ("What is B?", "Yes", ("Yes",), "machine", "chartqa", "test")
    assert s.load_image().getpixel((0, 0)) == (10, 5, 7) and s.load_image().size == (6, 4)
    assert samples[0].category == "human"
    assert len(load_dataset("chartqa", path=path, split="train")) == 1
    with pytest.raises(DataError, match="no split 'val'"):
        load_dataset("chartqa", path=path, split="val")


def test_chartqa_parquet_file_and_limit_shuffle(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"image": _imgs(10), "query": [f"q{i}" for i in range(10)],
                                     "label": [[str(i)] for i in range(10)]})
    f = tmp_path / "test-00000.parquet"
    ds.to_parquet(str(f))
    assert [s.answer for s in load_dataset("chartqa", path=f, limit=3)] == ["0", "1", "2"]
    a = load_dataset("chartqa", path=f, limit=4, shuffle=True, seed=1)
    b = load_dataset("chartqa", path=f, limit=4, shuffle=True, seed=1)
    assert a == b and len(a) == 4 and [s.answer for s in a] != ["0", "1", "2", "3"]
    assert all(s.id == f"chartqa-test-{int(s.answer):06d}" for s in a)  # row index, not position
    folder = tmp_path / "folder"
    folder.mkdir()
    ds.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    assert len(load_dataset("chartqa", path=folder, split="test")) == 10


def test_docvqa_fake_copy(tmp_path):
    path = _save(tmp_path, "docvqa", {
        "questionId": ["337", "338", "339"], "question": ["Date?", "To whom?", "Hidden?"],
        "question_types": [["handwritten", "form"], [], None], "image": _imgs(3),
        "docId": [1, 1, 2], "answers": [["1/2/93", "1/2/93", "Jan 2"], ["Bob"], []],
        "data_split": ["val"] * 3,
    }, split="validation")
    samples = load_dataset("docvqa", path=path)
    assert [s.id for s in samples] == ["docvqa-337", "docvqa-338"]  # no answers -> skipped
    assert (samples[0].answer, samples[0].answers, samples[0].category) == \
        ("1/2/93", ("1/2/93", "1/2/93", "Jan 2"), "handwritten")
    assert samples[1].category == "" and samples[1].candidates == () and samples[1].label == -1


def test_docvqa_all_answers_hidden(tmp_path):
    path = _save(tmp_path, "docvqa", {"questionId": ["1"], "question": ["q"], "image": _imgs(1),
                                      "answers": [[]]}, split="test")
    with pytest.raises(DataError, match="no usable sample.*split='validation'"):
        load_dataset("docvqa", path=path, split="test")


def test_textvqa_fake_copy(tmp_path):
    path = _save(tmp_path, "textvqa", {
        "image_id": ["a", "b"], "question_id": [34602, 34603], "question": ["Brand?", "Number?"],
        "image": _imgs(2), "answers": [["nokia"] * 6 + ["toshiba"] * 4, ["5", "6", "6"]],
        "image_classes": [["x"], ["y"]], "set_name": ["val", "val"],
    }, split="validation")
    samples = load_dataset("textvqa", path=path)
    assert [(s.id, s.answer, len(s.answers)) for s in samples] == \
        [("textvqa-34602", "nokia", 10), ("textvqa-34603", "6", 3)]


def test_vqav2_fake_copy(tmp_path):
    def ans(words):
        return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1}
                for i, w in enumerate(words)]

    path = _save(tmp_path, "vqav2", {
        "question_type": ["is the", "how many", "what"],
        "multiple_choice_answer": ["yes", "2", "red"],
        "answers": [ans(["yes"] * 7 + ["no"] * 3), ans(["2"] * 5 + ["3"] * 5),
                    ans(["blue"] * 5 + ["red"] * 5)],
        "image_id": [1, 2, 3], "answer_type": ["yes/no", "number", "other"],
        "question_id": [10, 20, 30], "question": ["Is the cat on?", "How many?", "Colour?"],
        "image": _imgs(3),
    }, split="validation")
    yes, two, red = load_dataset("vqav2", path=path)
    assert (yes.id, yes.answer, yes.candidates, yes.label, yes.category, len(yes.answers)) == \
        ("vqav2-10", "yes", ("yes", "no"), 0, "yes/no", 10)
    assert (two.answer, two.candidates, two.label, two.category) == ("2", (), -1, "number")
    assert red.answer == "red"  # tie broken by multiple_choice_answer


def test_scienceqa_fake_copy(tmp_path):
    imgs = _imgs(3)
    path = _save(tmp_path, "scienceqa", {
        "image": [imgs[0], None, imgs[2]],
        "question": ["Which is a mammal?", "Text only?", "Which is hotter?"],
        "choices": [["frog", "dog"], ["a", "b"], ["ice", "tea", "lava"]],
        "answer": [1, 0, 2], "hint": ["", "", "Look at the picture."],
        "subject": ["natural science", "language science", "natural science"],
        "lecture": ["", "", ""],
    }, split="test")
    samples = load_dataset("scienceqa", path=path)
    assert [s.id for s in samples] == ["scienceqa-test-000000", "scienceqa-test-000002"]
    s = samples[1]
    assert s.question == "Context: Look at the picture.\nWhich is hotter?\nA. ice\nB. tea\nC. lava"
    assert (s.answer, s.answers, s.candidates, s.label, s.category) == \
        ("C", ("C",), ("A", "B", "C"), 2, "natural science")
    assert samples[0].question == "Which is a mammal?\nA. frog\nB. dog" and samples[0].label == 1
    assert [x.id for x in load_dataset("scienceqa", path=path, limit=1, shuffle=True, seed=0)][0] \
        in {"scienceqa-test-000000", "scienceqa-test-000002"}


def test_hf_missing_column(tmp_path):
    path = _save(tmp_path, "bad", {"image": _imgs(1), "prompt": ["q"], "answers": [["a"]]})
    with pytest.raises(DataError, match="no question column .*query, question.*prompt"):
        load_dataset("chartqa", path=path)


@pytest.mark.parametrize("name, hub", [("chartqa", "HuggingFaceM4/ChartQA"),
                                       ("docvqa", "lmms-lab/DocVQA"),
                                       ("textvqa", "lmms-lab/textvqa"),
                                       ("vqav2", "lmms-lab/VQAv2"),
                                       ("scienceqa", "derek-thomas/ScienceQA")])
def test_hf_missing_local_copy_names_fetch_command(tmp_path, name, hub):
    with pytest.raises(DataError) as info:
        load_dataset(name, path=tmp_path / "absent")
    msg = str(info.value)
    assert f"datasets.load_dataset('{hub}'" in msg and ".save_to_disk(" in msg
    assert f"path='/path/{name}'" in msg


def test_hf_not_in_cache_names_fetch_command(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    with pytest.raises(DataError, match=r"(?s)not in the Hugging Face cache.*"
                                        r"load_dataset\('lmms-lab/DocVQA', 'DocVQA', split="):
        load_dataset("docvqa")


# --------------------------------------------------------------------------------------------
# blind conditions


@pytest.mark.parametrize("n", [2, 3, 4, 5, 10, 101, 1000])
def test_derangement(n):
    for seed in range(20):
        perm = derangement(n, seed)
        assert sorted(perm.tolist()) == list(range(n))
        assert not np.any(perm == np.arange(n))
        assert np.array_equal(perm, derangement(n, seed))
    distinct = len({tuple(derangement(n, s)) for s in range(20)})
    assert distinct >= {2: 1, 3: 2}.get(n, 6)  # only D(2)=1 and D(3)=2 derangements exist


@pytest.mark.parametrize("n", [0, 1, -3, 2.0, True])
def test_derangement_rejects_small_n(n):
    with pytest.raises(ConfigError, match="n"):
        derangement(n, 0)


def test_blind_black_and_mean():
    orig = Image.new("L", (7, 5), 200)
    black = blind_image("black", orig)
    assert (black.mode, black.size) == ("RGB", (7, 5))
    assert _pixels(black) == bytes(7 * 5 * 3)
    mean = blind_image("mean", orig, mean_rgb=(10.5, 0.4, 254.6))
    assert (mean.mode, mean.size) == ("RGB", (7, 5))
    assert _pixels(mean) == bytes([11, 0, 255]) * 35
    with pytest.raises(ConfigError, match="mean_rgb"):
        blind_image("mean", orig)
    with pytest.raises(ConfigError, match="mean_rgb"):
        blind_image("mean", orig, mean_rgb=(1, 2, 300))


def test_blind_randomimage():
    orig = _solid((0, 0, 0), (9, 4))
    same = Image.new("RGB", (9, 4))
    same.putdata([(i, 2 * i, 3 * i) for i in range(36)])
    out = blind_image("randomimage", orig, donor=same)
    assert _pixels(out) == _pixels(same) and out is not same
    resized = blind_image("randomimage", orig, donor=Image.new("RGBA", (30, 17), (5, 6, 7, 255)))
    assert (resized.mode, resized.size) == ("RGB", (9, 4))
    assert _colours(resized) == {(5, 6, 7)}
    grad = Image.linear_gradient("L").resize((40, 40))
    expected = grad.convert("RGB").resize((9, 4), Image.Resampling.BICUBIC)
    assert _pixels(blind_image("randomimage", orig, donor=grad)) == _pixels(expected)
    with pytest.raises(ConfigError, match="donor"):
        blind_image("randomimage", orig)
    with pytest.raises(UnknownNameError, match="randomimage"):
        blind_image("white", orig)


def test_mean_rgb_exact_and_pixel_weighted(tmp_path):
    a = Sample("a", "q", "x", ("x",), "d", "s", image=_solid((0, 0, 0), (1, 1)))
    b = Sample("b", "q", "x", ("x",), "d", "s", image=_solid((40, 80, 120), (3, 1)))
    broken = Sample("c", "q", "x", ("x",), "d", "s", image_path=str(tmp_path / "missing.png"))
    assert mean_rgb([a, b, broken]) == (30.0, 60.0, 90.0)
    two = Image.new("RGB", (2, 1))
    two.putdata([(1, 2, 3), (2, 2, 2)])
    assert mean_rgb([Sample("t", "q", "x", ("x",), "d", "s", image=two)]) == (1.5, 2.0, 2.5)
    with pytest.raises(DataError, match="no loadable image"):
        mean_rgb([broken])
