"""Scoring of generations (lmms-eval rules, quirks included) and forced-choice accuracy: exact values."""

import re

import numpy as np
import pytest

from gapcache.analyze.scoring import (
    anls, evalai_normalize, forced_choice_correct, gold_candidate_index, levenshtein, relaxed_accuracy,
    relaxed_correctness, score_generation, score_generations, textvqa_accuracy, vqa_accuracy,
)
from gapcache.errors import ConfigError


@pytest.mark.parametrize("pred, target, want", [
    ("2019", "2020", 1.0),      # years are numbers: 1/2020 = 0.05 % off
    ("1950", "2020", 1.0),      # 3.47 % off: still "correct" under lmms-eval's rule
    ("1900", "2020", 0.0),      # 5.9 % off
    ("105", "100", 1.0),        # exactly 5 %: inclusive
    ("105.1", "100", 0.0),
    ("12%", "12%", 1.0),
    ("12%", "12", 0.0),         # 0.12 vs 12
    ("12", "12%", 0.0),
    ("12%", "0.12", 1.0),       # '%' divides by 100
    ("5.", "5", 1.0),           # float('5.') parses
    ("yes.", "yes", 0.0),       # non-numbers: exact match only
    ("Yes", "yes", 1.0),        # ... after lowercasing
    (" yes", "yes", 0.0),       # ... the task rule itself does not strip (score_generation does, first)
    ("1,000", "1000", 0.0),     # '1,000' is not a number for float()
    ("1,000", "1,000", 1.0),
    ("0.0", "0", 0.0),          # target 0: exact string match
    ("0", "0", 1.0),
    ("1e3", "1000", 1.0),
    ("nan", "nan", 0.0),        # NaN never compares
    ("-95", "-100", 1.0),       # relative to |target|
])
def test_chartqa_relaxed_accuracy(pred, target, want):
    assert relaxed_accuracy(pred, target) == want
    assert relaxed_correctness(pred, target) is bool(want)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("pred, refs, want", [
    ("hello", ["hello"], 1.0),
    ("Hello ", ["hello"], 1.0),                 # case and outer spaces normalized
    ("abce", ["abcd"], 0.75),
    ("ab", ["ac"], 0.5),                        # exactly the threshold: kept
    ("abc", ["axy"], 0.0),                      # 1/3 < 0.5 -> 0
    ("abce", ["xyz", "abcd", "abcf"], 0.75),    # best gold answer
    ("a c", ["  a b  "], 1 - 1 / 7),            # lmms-eval: distance on normalized, length on raw strings
    ("", [""], 1.0),
    ("", ["abc"], 0.0),
])
def test_docvqa_anls(pred, refs, want):
    assert anls(pred, refs) == pytest.approx(want, abs=1e-12)


def test_anls_needs_a_reference():
    with pytest.raises(ConfigError, match="The 'references' parameter of anls"):
        anls("x", [])


@pytest.mark.parametrize("text, want", [
    ("Yes.", "yes"), ("Two dogs!", "2 dogs"), ("The cat", "cat"), ("an apple", "apple"),
    ("dont", "don't"), ("3.5", "3.5"), ("1,000", "1000"), ("What?", "what"), ("eleven", "eleven"),
    ("red-orange", "red orange"), ("red - orange", "red orange"), ("man's hat", "man 's hat"),
])
def test_evalai_normalization(text, want):
    assert evalai_normalize(text) == want


@pytest.mark.parametrize("pred, answers, want", [
    ("2", ["2"] * 10, 1.0),
    ("two", ["2"] * 10, 1.0),                         # number word -> digit
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),          # 3 matches: (3 * 2/3 + 7 * 1) / 10
    ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),          # (2 * 1/3 + 8 * 2/3) / 10
    ("yes", ["yes"] + ["no"] * 9, 0.3),              # (0 + 9 * 1/3) / 10
    ("Yes.", ["yes"] * 4 + ["no"] * 6, 1.0),          # 4 matches: every leave-one-out subset has >= 3
    ("maybe", ["yes"] * 10, 0.0),
    ("the dog", ["dog"] * 3 + ["cat"] * 7, 0.9),      # articles dropped
    ("1,000", ["1,000"] * 3 + ["1000"] * 7, 1.0),    # mixed golds are normalized: all 10 match
    # lmms-eval HEAD (#794) normalizes identical golds too (the old rule kept their comma: 0.0)
    ("1,000", ["1,000"] * 10, 1.0),
    ("yes", ["Yes"] * 10, 1.0),                      # old rule: 0.0
    ("2", ["two"] * 10, 1.0),                        # old rule: 0.0
    ("man's", ["man's"] * 10, 1.0),                  # no EvalAI "'s" split on the prediction (old rule: 0.0)
    ("red,white", ["red white"] * 5 + ["red"] * 5, 1.0),   # old rule: 0.0
    ("." * 40 + "yes", ["yes"] * 10, 0.0),           # at most 32 periods go, once (old rule: 1.0)
    ("." * 32 + "yes", ["yes"] * 10, 1.0),
    ("Black.", ["black"] * 10, 1.0),                 # the example of lmms-eval #794
    ("yes\n", ["yes\t"] * 10, 1.0),                   # newlines / tabs -> spaces, stripped
])
def test_vqav2_accuracy(pred, answers, want):
    assert vqa_accuracy(pred, answers) == pytest.approx(want, abs=1e-12)


def test_vqav2_leave_one_out_is_by_position():
    # duplicates are separate annotators: 3 equal golds each leave 2 others (2/3), 7 others see all 3 (1.0)
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("cat", ["cat", "cat"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("pred, answers, want", [
    ("Yes", ["yes"] * 10, 1.0),
    ("man's", ["man's"] * 10, 1.0),                  # both sides get the EvalAI "'s" split
    ("1,000", ["1,000"] * 10, 1.0),                  # ',' dropped on both sides
    ("Nike", ["nike"] * 2 + ["adidas"] * 8, 0.6),
    ("the STOP sign", ["stop sign"] * 4 + ["stop"] * 6, 1.0),
    ("two", ["2"] * 3 + ["3"] * 7, 0.9),
    ("." * 40 + "yes", ["yes"] * 10, 0.0),           # the 32-period cap holds for TextVQA too
])
def test_textvqa_accuracy(pred, answers, want):
    assert textvqa_accuracy(pred, answers) == pytest.approx(want, abs=1e-12)
    assert score_generation("textvqa", pred, answers) == pytest.approx(want, abs=1e-12)


def test_anls_takes_the_best_of_every_gold():
    assert anls("J. Smith", ["John Smith"]) == pytest.approx(0.7)
    assert anls("J. Smith", ["John Smith", "J. Smith"]) == 1.0


def test_score_generation_strips_the_prediction():
    assert score_generation("chartqa", "Yes ", "yes") == 1.0 and relaxed_accuracy("Yes ", "yes") == 0.0
    assert score_generation("chartqa", "\n 12 \t", ["12"]) == 1.0
    assert score_generation("docvqa", "  hello\n", ["hello"]) == 1.0
    assert score_generation("vqav2", " yes ", ["yes"] * 10) == 1.0
    assert score_generation("exact", " Yes ", ["yes"]) == 1.0 and score_generation("exact", "", ["yes"]) == 0.0


@pytest.mark.parametrize("call, parameter", [
    (lambda: vqa_accuracy("yes", "yes"), "'answers' parameter of vqa_accuracy"),
    (lambda: textvqa_accuracy("yes", "yes"), "'answers' parameter of textvqa_accuracy"),
    (lambda: anls("yes", "yes"), "'references' parameter of anls"),
    (lambda: score_generation("vqav2", "yes", "yes"), "'golds' parameter of score_generation('vqav2', ...)"),
    (lambda: score_generations("vqav2", ["yes"], "y"), "'golds' parameter of score_generations"),
    (lambda: vqa_accuracy("yes", []), "must hold at least one gold answer"),
])
def test_a_plain_string_where_golds_are_needed_is_an_error(call, parameter):
    with pytest.raises(ConfigError, match=re.escape(parameter)):
        call()


def test_score_generations_dispatch():
    np.testing.assert_allclose(score_generations("chartqa", ["2019", "no"], ["2020", "yes"]), [1.0, 0.0])
    np.testing.assert_allclose(score_generations("docvqa", ["abce"], [["abcd"]]), [0.75])
    np.testing.assert_allclose(score_generations("vqav2", ["yes"], [["yes"] * 3 + ["no"] * 7]), [0.9])
    np.testing.assert_allclose(score_generations(["vqav2", "chartqa"], ["yes", "5"], [["yes"] * 10, ["5.1"]]),
                               [1.0, 1.0])
    with pytest.raises(ConfigError, match="The 'task' parameter of score_generation must be one of"):
        score_generations("mmmu", ["a"], ["a"])
    with pytest.raises(ConfigError, match="one entry per prediction"):
        score_generations("chartqa", ["a", "b"], ["a"])


def test_forced_choice_uses_own_candidates_and_gold_index():
    lp = np.array([[[0.0, -1.0, 9.0], [-3.0, -1.0, -2.0], [np.nan, np.nan, np.nan], [-1.0, -1.0, -5.0]]])
    mask = np.array([[True, True, False], [True, True, True], [True, True, True], [True, True, True]])
    gold = np.array([0, 2, 0, 1])
    # s0: 9.0 is masked out -> candidate 0 (right); s1: argmax 1 != 2; s2: not scored -> NaN; s3: tie -> first (0) != 1
    np.testing.assert_array_equal(forced_choice_correct(lp, mask, gold), [[1.0, 0.0, np.nan, 0.0]])
    no_gold = forced_choice_correct(lp[0], mask, np.array([-1, 1, 0, 0]))
    assert np.isnan(no_gold[0]) and no_gold[3] == 1.0
    with pytest.raises(ConfigError, match="forced_choice_correct needs"):
        forced_choice_correct(lp, mask[:2], gold)


def test_gold_candidate_index():
    np.testing.assert_array_equal(gold_candidate_index(["no", "yes", "maybe"], ["no", "yes"]), [0, 1, -1])
