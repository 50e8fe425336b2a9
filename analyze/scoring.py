"""Task-sensitive scoring of generations (lmms-eval's rules) and forced-choice accuracy. No torch.

The generation rules follow lmms-eval (EvolvingLMMs-Lab/lmms-eval: ``tasks/chartqa/utils.py``,
``api/metrics.py::anls``, ``tasks/vqav2/utils.py`` with ``tasks/_task_utils/vqa_eval_metric.py``),
re-implemented here, quirks included, so that gapcache numbers match published lmms-eval numbers:

* **ChartQA relaxed accuracy** (:func:`relaxed_correctness`): both strings parsed with Python's
  ``float`` (a trailing ``%`` divides by 100); if the prediction parses and the target parses to
  a nonzero number, correct iff |pred - target| / |target| <= 0.05; otherwise exact match after
  lowercasing, *without* stripping. Consequences: years are numbers ("2019" vs "2020" is 0.05 %
  off: correct; even "1950" vs "2020" is 3.5 % off: correct); "12%" vs "12" is 0.12 vs 12: wrong,
  "12%" vs "0.12": correct; "5." parses as 5.0; "1,000" does not parse, so it only matches the
  string "1,000"; a target "0" needs an exact string match ("0.0" is wrong); "nan" never matches.
* **DocVQA ANLS** (:func:`anls`): for each gold answer, NL = lev(g', p') / max(len(g), len(p))
  with g', p' lowercased, stripped and whitespace-collapsed, but the lengths taken on the *raw*
  strings (lmms-eval's quirk); score = 1 - min NL over gold answers, set to 0 when < 0.5.
* **VQAv2 accuracy** (:func:`vqa_accuracy`): acc = mean over the 10 leave-one-out subsets of
  min(1, #matches among the other 9 / 3), after EvalAI normalization (:func:`evalai_normalize`:
  lowercase, drop ',' and '?', punctuation, periods not followed by a digit, articles, number
  words zero..ten -> digits, contractions). As in lmms-eval (and the official VQA script) the gold
  answers are normalized only when they are not all identical; so ten identical golds "1,000"
  score a prediction "1,000" as 0 (the prediction loses its comma, the golds keep theirs).

Forced choice (:func:`forced_choice_correct`): argmax of the candidate log-probs over the
sample's own candidates (mask (sample, candidate)) == the gold candidate index.

Usage::

    from gapcache.analyze.scoring import score_generations, forced_choice_correct, gold_candidate_index
    score_generations("chartqa", ds.generation.sel(condition="original").values, ds.answer.values)
    gold = gold_candidate_index(ds.answer.values, ds.candidate.values)
    forced_choice_correct(ds.candidate_logprob.values, ds.candidate_mask.values, gold)  # (condition, sample)
"""

from __future__ import annotations

import re

import numpy as np

from gapcache.errors import ConfigError

TASKS = ("chartqa", "docvqa", "vqav2")

# ------------------------------------------------------------------------------------ ChartQA


def _to_float(text: str):
    """float(text), with 'x%' -> x / 100; None if it does not parse (lmms-eval's rule)."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """|p - t| / |t| <= max_relative_change when p parses and t parses nonzero; else p.lower() == t.lower()."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, target: str) -> float:
    """ChartQA relaxed accuracy of one generation: 1.0 or 0.0 (5 % relative tolerance)."""
    return 1.0 if relaxed_correctness(prediction, target) else 0.0


# ------------------------------------------------------------------------------------- DocVQA


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        cur = [j]
        for i, ca in enumerate(a, 1):
            cur.append(prev[i - 1] if ca == cb else 1 + min(prev[i - 1], prev[i], cur[-1]))
        prev = cur
    return prev[-1]


def anls(prediction: str, references, threshold: float = 0.5) -> float:
    """ANLS = 1 - min_g lev(g', p') / max(len(g), len(p)), zeroed below ``threshold`` (see module doc)."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ConfigError("The 'references' parameter of anls must hold at least one gold answer. Got none instead.")
    p_norm = " ".join(prediction.strip().lower().split())
    values = []
    for g in refs:
        length = max(len(g.upper()), len(prediction.upper()))
        dist = levenshtein(" ".join(g.strip().lower().split()), p_norm)
        values.append(0.0 if length == 0 else dist / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


# -------------------------------------------------------------------------------------- VQAv2

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
# EvalAI's pattern as written: '(?!<=\d)' is a look-ahead (not a look-behind), so it strips every
# period not followed by a digit ("yes." -> "yes", "2.5" kept, "2." -> "2").
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def process_punctuation(text: str) -> str:
    """Each mark of PUNCTUATION -> '' if it touches a space or the text has a digit,digit comma, else -> ' '.

    Then PERIOD_STRIP removes periods not followed by a digit.
    """
    out = text
    squeeze = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if (squeeze or p + " " in text or " " + p in text) else " ")
    # lmms-eval passes re.UNICODE (== 32) as sub's positional *count*: at most 32 periods go.
    return PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """Lowercase, number words -> digits, drop articles, expand contractions, single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def evalai_normalize(answer: str) -> str:
    """EvalAI answer processing: lowercase, drop ',' '?', "'s" -> " 's", whitespace, punctuation, digits/articles."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers) -> float:
    """acc = (1/n) sum_i min(1, #{j != i : a_j == pred} / 3) over the n (= 10) gold answers."""
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if not answers:
        raise ConfigError("The 'answers' parameter of vqa_accuracy must hold the gold answers. Got none instead.")
    pred = evalai_normalize(prediction)
    if len(set(answers)) > 1:
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        pred = process_digit_article(process_punctuation(pred))
    match = np.array([a == pred for a in answers])
    others = match.sum() - match  # matches among the other answers, per left-out answer
    return float(np.mean(np.minimum(1.0, others / 3.0)))


# ----------------------------------------------------------------------------------- dispatch

_SCORERS = {
    "chartqa": lambda p, g: relaxed_accuracy(p, g if isinstance(g, str) else list(g)[0]),
    "docvqa": anls,
    "vqav2": vqa_accuracy,
}


def score_generation(task: str, prediction: str, gold) -> float:
    """One generation's score: chartqa (gold: str), docvqa (gold: str or list), vqav2 (gold: the 10 answers)."""
    if task not in _SCORERS:
        raise ConfigError(
            f"The 'task' parameter of score_generation must be one of {list(TASKS)}. Got {task!r} instead."
        )
    return float(_SCORERS[task](str(prediction), gold))


def score_generations(task: str, predictions, golds) -> np.ndarray:
    """Scores of many generations (sample,) -> float array (sample,)."""
    predictions = list(np.asarray(predictions, dtype=object).ravel())
    golds = list(golds)
    if len(golds) != len(predictions):
        raise ConfigError(f"The 'golds' parameter of score_generations must have one entry per prediction "
                          f"({len(predictions)}). Got {len(golds)} instead.")
    return np.array([score_generation(task, p, g) for p, g in zip(predictions, golds)], dtype=np.float64)


# ------------------------------------------------------------------------------ forced choice


def gold_candidate_index(answers, candidates) -> np.ndarray:
    """Index of each gold answer in the store's ``candidate`` coordinate; -1 when absent."""
    pos = {str(c): i for i, c in enumerate(candidates)}
    return np.array([pos.get(str(a), -1) for a in np.asarray(answers, dtype=object).ravel()], dtype=np.int64)


def forced_choice_correct(candidate_logprob, mask, gold_index) -> np.ndarray:
    """1.0 where argmax_{c : mask[i, c]} logprob[..., i, c] == gold_index[i], else 0.0.

    ``candidate_logprob`` (..., sample, candidate), ``mask`` (sample, candidate) the sample's own
    candidates, ``gold_index`` (sample,). NaN where the sample has no finite own candidate score
    (not extracted / failed) or no gold candidate (index -1). Ties go to the first candidate.
    """
    lp = np.asarray(candidate_logprob, dtype=np.float64)
    mask, gold = np.asarray(mask, dtype=bool), np.asarray(gold_index, dtype=np.int64)
    if lp.ndim < 2 or mask.shape != lp.shape[-2:] or gold.shape != lp.shape[-2:-1]:
        raise ConfigError(
            f"forced_choice_correct needs candidate_logprob (..., sample, candidate), mask (sample, candidate) and "
            f"gold_index (sample,). Got shapes {lp.shape}, {mask.shape} and {gold.shape} instead."
        )
    scored = np.where(mask & np.isfinite(lp), lp, -np.inf)
    choice = np.argmax(scored, axis=-1)
    ok = np.isfinite(scored).any(axis=-1) & (gold >= 0)
    return np.where(ok, (choice == gold).astype(np.float64), np.nan)
