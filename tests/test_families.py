"""The family registry: every family one adapter that owns all of its knowledge. Torch-free."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gapcache.errors import UnknownNameError
from gapcache.extract.families import ADAPTERS, Adapter, get_adapter
from gapcache.extract.families.qwen import QwenVLAdapter

ROOT = Path(__file__).resolve().parents[1]
# a branch on a family name: family == "llava", "qwen2_vl" != x, .startswith("qwen3")
FAMILY_BRANCH = re.compile(r"""[!=]=\s*["'](llava|qwen)|["'](llava|qwen)\w*["']\s*[!=]=|startswith\(\s*["'](llava|qwen)""")


@pytest.mark.parametrize("family", tuple(ADAPTERS))
def test_each_family_is_one_adapter_class(family):
    a = get_adapter(family)
    assert isinstance(a, Adapter) and a.family == family and a.model_class.endswith("ForConditionalGeneration")
    for method in ("n_image_tokens", "build_tiny"):
        assert getattr(type(a), method) is not getattr(Adapter, method), f"{family} inherits the abstract {method}"
    if isinstance(a, QwenVLAdapter):
        for method in ("tiny_update", "tiny_processor_parts"):
            assert getattr(type(a), method) is not getattr(QwenVLAdapter, method)
    assert a.norm_offset == 0.0  # Llama / Qwen RMSNorm: w * h / rms


def test_unknown_family():
    with pytest.raises(UnknownNameError, match="Unknown model family 'blip2'"):
        get_adapter("blip2")


def test_question_char_end_moves_past_the_expanded_placeholder():
    a = get_adapter("llava")
    prompt = "USER: <image>\nIs it red? ASSISTANT:"
    end = prompt.index("?") + 1
    assert a.question_char_end(prompt, "Is it red?", 1, "<image>") == end
    assert a.question_char_end(prompt, "Is it red?", 4, "<image>") == end + 3 * len("<image>")


def test_nothing_outside_the_adapters_branches_on_family_names():
    hits = []
    for folder in ("core", "extract", "analyze", "store", "slurm"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "families" in path.relative_to(ROOT).parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if FAMILY_BRANCH.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "family knowledge outside extract/families:\n" + "\n".join(hits)
