"""Issue 12: every bad input and fault answered in one line, before the model loads where it can;
no silently wrong store, no leftovers. The table of what a user sees is docs/faults.md."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gapcache.errors import DataError, SampleError
from gapcache.extract.data import load_dataset


# ------------------------------------------------------------------ images (item 1) and manifests (items 9, 11)
def _manifest(tmp_path, rows, name="m.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _gradient16():
    return (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_a_wide_grayscale_image_is_scaled_to_8_bits_not_clipped_to_white(tmp_path, mode):
    a16 = _gradient16()
    if mode == "I;16":
        im = Image.fromarray(a16)
    elif mode == "I;16B":
        im = Image.frombytes("I;16B", (64, 64), a16.astype(">u2").tobytes())
    elif mode == "I":
        im = Image.fromarray(a16.astype(np.int32))
    else:
        im = Image.fromarray((a16 / 65535.0).astype(np.float32))
    assert im.mode == mode
    path = tmp_path / ("x.png" if mode.startswith("I;16") else "x.tiff")
    im.save(path)
    p = _manifest(tmp_path, [{"id": "g", "image": path.name, "question": "q", "answer": "a"}])
    (s,) = load_dataset("manifest", path=p)
    rgb = np.asarray(s.load_image())
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    want = np.rint(a16 / 257.0).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - want).max() <= 1  # a gradient, not white
    assert rgb.min() == 0 and rgb.max() >= 254 and (rgb == 255).mean() < 0.01


def test_a_16bit_png_hashes_as_its_scaled_image_not_as_white(tmp_path):
    from gapcache.extract.data import pixel_sum

    Image.fromarray(_gradient16()).save(tmp_path / "x.png")
    p = _manifest(tmp_path, [{"id": "g", "image": "x.png", "question": "q", "answer": "a"}])
    (s,) = load_dataset("manifest", path=p)
    total, n = pixel_sum(s.load_image())
    assert n == 64 * 64 and 100 < total[0] / n < 155  # mean of the gradient, not 255


def test_an_image_path_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "d.png").mkdir()
    p = _manifest(tmp_path, [{"id": "d", "image": "d.png", "question": "q", "answer": "a"}])
    (s,) = load_dataset("manifest", path=p)
    with pytest.raises(SampleError, match="is a directory, not an image file"):
        s.load_image()


def test_a_non_utf8_manifest_line_is_named_by_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    good = json.dumps({"id": "0", "image": "a.png", "question": "q", "answer": "a"})
    p.write_bytes(good.encode() + b"\n" + b'{"id": "1", "image": "a.png", "question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"m.jsonl:2: the manifest must be UTF-8 text. Got byte 0xe9 at column"):
        load_dataset("manifest", path=p)
