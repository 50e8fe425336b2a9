"""The site registry: finders in order, position sites matching the store's ``site`` axis, the
values recorded for a sample whose sites were (partly) not found. Torch-free, synthetic prompts."""

from __future__ import annotations

import pytest

from gapcache.errors import SiteError
from gapcache import sites as S
from gapcache.extract.families import get_adapter
from gapcache.extract.plan import PlannedSample
from gapcache.store.schema import SITES as STORE_SITES

IMG, SPECIAL = 9, 1  # image token id, a template token id


def context(ids, offsets, n_image_tokens=3, prompt="<s>U: <i>\nred? A:", question="red?", image_token="<i>",
            question_start=10):
    return S.SiteContext(sample_id="s0", ids=ids, offsets=offsets, special_ids={SPECIAL, IMG}, image_token_id=IMG,
                         image_token=image_token, n_image_tokens=n_image_tokens, prompt=prompt, question=question,
                         adapter=get_adapter("llava"), question_start=question_start)


# "<s>U: <i><i><i>\nred? A:" as the processor sees it: the placeholder expanded to 3 copies (+6 chars)
IDS = [SPECIAL, 5, IMG, IMG, IMG, 6, 7, 8]
OFFSETS = [(0, 3), (3, 5), (6, 9), (9, 12), (12, 15), (16, 19), (19, 20), (21, 23)]


def test_position_sites_match_the_store_site_axis():
    assert S.POSITION_SITES == STORE_SITES


def test_registry_kinds_and_missing_values():
    assert S.SITES["visual"].kind == S.SPAN and S.SITES["visual"].missing == (-1, 0)
    assert {S.SITES[n].kind for n in S.POSITION_SITES} == {S.POSITION}
    assert S.SPAN_SITES == ("visual", "question")
    assert S.position_row({}) == [-1] * len(S.POSITION_SITES)


def test_find_sites_on_an_expanded_placeholder():
    found = S.find_sites(context(IDS, OFFSETS), {})
    # "?" (index 6, chars 19..20) ends the question after the +6 shift; "A:" (21..23) lies beyond it
    assert found == {"visual": (2, 3), "instruction": 6, "prediction": 7, "question": (5, 2)}  # "red", "?"
    assert S.position_row(found) == [found[n] for n in STORE_SITES]


def test_a_later_site_failing_keeps_the_earlier_ones():
    found = {}
    with pytest.raises(SiteError, match="no content token of the question"):
        only_template = [SPECIAL, SPECIAL, IMG, IMG, IMG, SPECIAL, SPECIAL, SPECIAL]
        S.find_sites(context(only_template, OFFSETS), found)
    assert found == {"visual": (2, 3)}
    p = PlannedSample(0, None, sites=found)
    assert (p.visual_start, p.visual_length, p.instruction, p.prediction) == (2, 3, -1, -1)


def test_visual_span_length_must_match_the_model():
    with pytest.raises(SiteError, match="visual span has 3 tokens but the model inserts 4"):
        S.find_sites(context(IDS, OFFSETS, n_image_tokens=4), {})
    split = [SPECIAL, IMG, 5, IMG, IMG, 6, 7, 8]
    with pytest.raises(SiteError, match="not one contiguous span"):
        S.find_sites(context(split, OFFSETS), {})


def test_planned_sample_defaults_when_nothing_was_found():
    p = PlannedSample(0, None)
    assert (p.visual_start, p.visual_length, p.instruction, p.prediction) == (-1, 0, -1, -1)


def test_instruction_skips_whitespace_only_tokens_of_the_question():
    # "<s>U: <i>\nred?   A:" with the question "red?  " (two trailing spaces) tokenized ..., "?", "  ", " A:"
    ids = [SPECIAL, 5, IMG, IMG, IMG, 6, 7, 10, 8]
    offsets = [(0, 3), (3, 5), (6, 9), (9, 12), (12, 15), (16, 19), (19, 20), (20, 22), (22, 25)]
    found = S.find_sites(context(ids, offsets, prompt="<s>U: <i>\nred?   A:", question="red?  "), {})
    assert found["instruction"] == 6  # '?', not the whitespace-only token after it


def test_instruction_is_found_in_the_user_turn_not_by_searching_the_prompt():
    # the question "A:" equals the template's generation prompt; question_start says which one it is
    prompt = "<s>U: <i>\nA: A:"
    ids = [SPECIAL, 5, IMG, IMG, IMG, 11, 8]
    offsets = [(0, 3), (3, 5), (6, 9), (9, 12), (12, 15), (16, 18), (19, 21)]
    found = S.find_sites(context(ids, offsets, prompt=prompt, question="A:"), {})
    assert found["instruction"] == 5 and found["prediction"] == 6
    with pytest.raises(S.SiteError, match="question's place in the prompt is unknown"):
        S.find_sites(context(ids, offsets, prompt=prompt, question="A:", question_start=None), {})


def test_question_char_span_shifts_only_past_a_preceding_placeholder():
    a = get_adapter("llava")
    assert a.question_char_span("U: <i>\nred? A:", 7, 4, 3, "<i>") == (13, 17)
    assert a.question_char_span("U: red? <i>\nA:", 3, 4, 3, "<i>") == (3, 7)  # image after the question
