"""Tiny offline checkpoints load and run through the real transformers path (gapcache.extract.tiny)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from gapcache.extract.tiny import FAMILIES, build_tiny_checkpoint, build_tokenizer  # noqa: E402

pytestmark = pytest.mark.integration

CLASS_NAMES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}
QUESTION = "Is there a red circle?"


def _load(path):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def _batch(proc, size=(64, 64)):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", size, (255, 0, 0))
    return text, proc(text=[text], images=[image], return_tensors="pt", padding=True)


def n_visual_features(model, batch) -> int:
    """Rows the vision tower + projector produce, i.e. what the model scatters into the sequence."""
    inner = model.model
    with torch.no_grad():
        if "image_grid_thw" in batch:
            feats = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        else:
            feats = inner.get_image_features(
                batch["pixel_values"],
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            )
    return sum(f.shape[0] for f in feats.pooler_output)  # each f: (n_tokens_i, text_hidden)


def _n_image_pads(model, batch) -> int:
    return int((batch["input_ids"] == model.config.image_token_id).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_and_runs(family, tmp_path):
    num_layers = 3
    path = build_tiny_checkpoint(family, tmp_path / family, num_layers=num_layers)
    assert sum(f.stat().st_size for f in path.iterdir()) < 3_000_000
    model, proc = _load(path)
    assert type(model).__name__ == CLASS_NAMES[family]
    assert len(model.model.language_model.layers) == num_layers

    tok = proc.tokenizer
    assert tok.pad_token is not None and tok.pad_token_id is not None
    image_token = "<image>" if family == "llava" else "<|image_pad|>"
    assert tok.convert_tokens_to_ids(image_token) == model.config.image_token_id
    if family != "llava":
        assert tok.convert_tokens_to_ids("<|vision_start|>") == model.config.vision_start_token_id
        assert tok.convert_tokens_to_ids("<|vision_end|>") == model.config.vision_end_token_id

    text, batch = _batch(proc)
    if family == "llava":
        assert text == f"USER: <image>\n{QUESTION} ASSISTANT:"
    else:
        assert f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n" in text
        assert text.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert _n_image_pads(model, batch) == n_visual_features(model, batch) == 16
    assert len(out.hidden_states) == num_layers + 1
    assert out.hidden_states[0].shape == (1, batch["input_ids"].shape[1], model.config.text_config.hidden_size)
    assert out.logits.shape[-1] >= len(tok)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic(family, tmp_path):
    a = build_tiny_checkpoint(family, tmp_path / "a", seed=3)
    b = build_tiny_checkpoint(family, tmp_path / "b", seed=3)
    c = build_tiny_checkpoint(family, tmp_path / "c", seed=4)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_dynamic_resolution_gives_ragged_spans(family, tmp_path):
    model, proc = _load(build_tiny_checkpoint(family, tmp_path / family))
    counts = []
    for size in [(64, 64), (96, 64)]:
        _, batch = _batch(proc, size)
        assert _n_image_pads(model, batch) == n_visual_features(model, batch)
        counts.append(_n_image_pads(model, batch))
    assert counts == [16, 24]


def test_build_tokenizer_byte_level_and_deterministic():
    corpus = ["the red circle is above the blue square"] * 20
    specials = ["<pad>", "<image>"]
    tok = build_tokenizer(corpus, specials, vocab_size=300)
    tok2 = build_tokenizer(corpus, specials, vocab_size=300)
    assert tok.backend_tokenizer.to_str() == tok2.backend_tokenizer.to_str()
    assert tok.pad_token == "<pad>"
    odd = "héllo wörld ✓ 日本 \t\n 123"
    assert tok.decode(tok(odd)["input_ids"]) == odd
    assert len(tok(" circle")["input_ids"]) == 1
    ids = tok("a <image> b")["input_ids"]
    assert tok.convert_tokens_to_ids("<image>") in ids


def test_unknown_family_rejected(tmp_path):
    with pytest.raises(ValueError):
        build_tiny_checkpoint("gpt2", tmp_path)


def test_train_tiny_curriculum_pools_add_kinds_phase_by_phase():
    from gapcache.extract.train_tiny import curriculum_pools

    kinds = ["count", "colour", "presence", "count", "colour"]
    starts, pools = curriculum_pools("count@600,colour@1100", kinds)
    assert starts == [0, 600, 1100]
    assert [p.tolist() for p in pools] == [[0, 3], [0, 1, 3, 4], [0, 1, 2, 3, 4]]
    assert curriculum_pools("", kinds)[0] == [0] and curriculum_pools("", kinds)[1][0].tolist() == [0, 1, 2, 3, 4]
    for bad in ("shape@10", "count@600,colour@500", "count"):
        with pytest.raises(ValueError, match="'curriculum' parameter of train_tiny"):
            curriculum_pools(bad, kinds)


def test_synthetic_centre_placement_covers_each_cell_centre():
    """placement="centre": every shape colours all four quadrants of its own cell (its cell's 2x2 patches
    at 32 px / patch 8), so the count is the number of coloured patches / 4; "free" does not promise it."""
    import numpy as np

    from gapcache.errors import ConfigError
    from gapcache.extract.data import load_dataset

    for s in load_dataset("synthetic", n=200, seed=3, kinds=["count"], placement="centre"):
        a = np.asarray(s.load_image()).astype(int)
        h, q = a.shape[0] // 2, a.shape[0] // 4
        cells = [a[y:y + h, x:x + h] for y in (0, h) for x in (0, h)]
        occupied = [c for c in cells if (c != 255).any()]
        assert len(occupied) == int(s.answer)
        for c in occupied:
            assert all((c[y:y + q, x:x + q] != 255).any() for y in (0, q) for x in (0, q))
    free = load_dataset("synthetic", n=6, seed=3, placement="free")
    centre = load_dataset("synthetic", n=6, seed=3)  # the default
    assert [s.question for s in free] == [s.question for s in centre]
    assert [s.image.tobytes() for s in centre] == [s.image.tobytes() for s in
                                                   load_dataset("synthetic", n=6, seed=3, placement="centre")]
    with pytest.raises(ConfigError, match="'placement' option of the synthetic dataset must be one of centre, free"):
        load_dataset("synthetic", n=6, placement="middle")


def test_shipped_model_was_trained_by_the_default_recipe():
    """builtin:tiny-llava-shapes is what ``python -m gapcache.extract.train_tiny`` (the defaults) writes:
    its training record holds exactly the default arguments, so retraining reproduces it (the weights
    bit for bit at the same thread count, checked when it is retrained), and it ends >= 0.9 on every kind."""
    import json
    import shlex
    from dataclasses import asdict
    from pathlib import Path

    from gapcache.extract.train_tiny import BUILTIN_NAME, TrainArgs, command_line, parse_args

    rec = json.loads((Path(__file__).parent.parent / "core" / "builtin" / BUILTIN_NAME / "training.json").read_text())
    assert rec["args"] == asdict(TrainArgs())
    assert rec["command"] == command_line(TrainArgs())
    assert parse_args(shlex.split(rec["command"])[3:])[0] == TrainArgs()  # the recorded command runs as is
    assert rec["history"][-1]["step"] == TrainArgs().steps
    assert min(rec["history"][-1]["val_accuracy"].values()) >= 0.9, rec["history"][-1]
