"""Task-sensitive scoring of generations (lmms-eval's rules at HEAD) and forced-choice accuracy. No torch.

Matched against lmms-eval (EvolvingLMMs-Lab/lmms-eval) main as of its v0.4.1 release line, i.e. with
PR #760 ("Fixed applying process_* twice on resAns for VQAv2", v0.3.5) and PR #794 ("Fix accuracy
computation for VQAv2", v0.4.1) merged; the files read were ``tasks/chartqa/utils.py`` (blob of commit
2bb5e985), ``api/metrics.py::anls``, ``tasks/textvqa/utils.py`` (e39bd931), ``tasks/vqav2/utils.py``
(7993835, before #760/#794, with the two PRs' changes applied as they describe them) and
``tasks/_task_utils/vqa_eval_metric.py::EvalAIAnswerProcessor`` (61e5060b). Re-implemented here, quirks
included, so that gapcache numbers match published lmms-eval numbers:

* **The prediction is stripped first** (:func:`score_generation`, as lmms-eval's generation tasks see
  it): ``'Yes '`` vs ``'yes'`` is 1.0 for ChartQA. The store keeps generations raw; stripping
  happens here, at scoring. The four per-task functions below are the task rules themselves and do
  not strip (except where the task rule does).
* **ChartQA relaxed accuracy** (:func:`relaxed_correctness`): both strings parsed with Python's
  ``float`` (a trailing ``%`` divides by 100); if the prediction parses and the target parses to
  a nonzero number, correct iff |pred - target| / |target| <= 0.05; otherwise exact match after
  lowercasing. Consequences: years are numbers ("2019" vs "2020" is 0.05 % off: correct; even "1950"
  vs "2020" is 3.5 % off: correct); "12%" vs "12" is 0.12 vs 12: wrong, "12%" vs "0.12": correct;
  "5." parses as 5.0; "1,000" does not parse, so it only matches the string "1,000"; a target "0"
  needs an exact string match ("0.0" is wrong); "nan" never matches. lmms-eval scores ChartQA
  against its one ``answer``; given several golds, the first is used.
* **DocVQA ANLS** (:func:`anls`): for each gold answer, NL = lev(g', p') / max(len(g), len(p))
  with g', p' lowercased, stripped and whitespace-collapsed, but the lengths taken on the *raw*
  strings upper-cased (lmms-eval's quirk); score = 1 - min NL over **all** gold answers, set to 0
  when < 0.5 (``'J. Smith'`` vs ``['John Smith', 'J. Smith']``: 1.0; vs ``'John Smith'`` alone: 0.7).
* **VQAv2 accuracy** (:func:`vqa_accuracy`, lmms-eval after #760 and #794): the prediction and
  *every* gold answer alike get newlines and tabs turned into spaces and are stripped, then
  ``process_punctuation`` and ``process_digit_article`` (lowercasing happens in the latter). The
  full EvalAI processor is *not* run on the prediction (so ``man's`` stays ``man's`` on both sides).
  acc = mean over the gold answers i (leave-one-out *by position*) of
  min(1, #{j != i : gold_j == pred} / 3). Kept quirk: ``process_punctuation`` passes ``re.UNICODE``
  (== 32) as ``re.sub``'s *count*, so at most 32 periods are removed, once (40 periods then ``yes``
  stays ``........yes``: 0.0).
* **TextVQA accuracy** (:func:`textvqa_accuracy`): the full EvalAI answer processor
  (:func:`evalai_normalize`: lowercase, drop ',' and '?', "'s" -> " 's", newlines/tabs, strip,
  punctuation, periods not followed by a digit, number words zero..ten -> digits, articles,
  contractions) on the prediction and on every gold; then the same leave-one-out by position.

Gold answers: ``anls``, ``vqa_accuracy`` and ``textvqa_accuracy`` need the *list* of golds; a plain
string there is an error naming the parameter (it would otherwise be iterated character by
character). The store keeps every gold per sample (``answers``, a JSON-encoded list per sample;
:func:`gapcache.store.reader.gold_answers` decodes it) and :func:`score_store` scores every
condition's generations, choosing the task per sample from its dataset (:data:`DATASET_TASKS`).

Forced choice (:func:`forced_choice_correct`): argmax of the candidate log-probs over the
sample's own candidates (mask (sample, candidate)) == the gold candidate index.

Usage::

    from gapcache.analyze.scoring import score_generation, score_store, forced_choice_correct, gold_candidate_index
    score_generation("vqav2", "Yes", ["yes"] * 10)                      # 1.0
    scores = score_store(ds)                                            # (condition, sample) DataArray
    gold = gold_candidate_index(ds.answer.values, ds.candidate.values)
    forced_choice_correct(ds.candidate_logprob.values, ds.candidate_mask.values, gold)  # (condition, sample)
"""

from __future__ import annotations

import re

import numpy as np

from gapcache.errors import ConfigError

TASKS = ("chartqa", "docvqa", "vqav2", "textvqa", "exact")
#: dataset name (``dataset_name`` in the store) -> scoring task; datasets not listed score with "exact"
DATASET_TASKS = {"chartqa": "chartqa", "docvqa": "docvqa", "vqav2": "vqav2", "textvqa": "textvqa"}


def gold_list(golds, parameter: str, function: str) -> list:
    """``golds`` as a list of str; a plain string (or bytes) is refused, naming ``parameter``."""
    if isinstance(golds, (str, bytes)):
        raise ConfigError(f"The {parameter!r} parameter of {function} must be a list of gold answers. Got the "
                          f"string {golds!r} instead (wrap it: [{golds!r}]).")
    try:
        out = [str(g) for g in (golds.tolist() if isinstance(golds, np.ndarray) else golds)]
    except TypeError:
        raise ConfigError(f"The {parameter!r} parameter of {function} must be a list of gold answers. "
                          f"Got {golds!r} instead.") from None
    if not out:
        raise ConfigError(f"The {parameter!r} parameter of {function} must hold at least one gold answer. "
                          "Got none instead.")
    return out

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
    """ANLS = 1 - min_g lev(g', p') / max(len(g), len(p)) over every gold g, zeroed below ``threshold``."""
    refs = gold_list(references, "references", "anls")
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


def vqa_normalize(answer: str) -> str:
    """VQAv2 (lmms-eval at HEAD): newlines/tabs -> spaces, strip, punctuation, digits/articles (no EvalAI word step)."""
    return process_digit_article(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def leave_one_out_accuracy(prediction: str, answers: list) -> float:
    """(1/n) sum_i min(1, #{j != i : answers[j] == prediction} / 3), leaving answers out by position."""
    match = np.array([a == prediction for a in answers])
    others = match.sum() - match  # matches among the other answers, per left-out position
    return float(np.mean(np.minimum(1.0, others / 3.0)))


def vqa_accuracy(prediction: str, answers) -> float:
    """VQAv2 accuracy: :func:`vqa_normalize` on the prediction and on every gold, then leave-one-out."""
    golds = [vqa_normalize(a) for a in gold_list(answers, "answers", "vqa_accuracy")]
    return leave_one_out_accuracy(vqa_normalize(prediction), golds)


def textvqa_accuracy(prediction: str, answers) -> float:
    """TextVQA accuracy: :func:`evalai_normalize` on the prediction and on every gold, then leave-one-out."""
    golds = [evalai_normalize(a) for a in gold_list(answers, "answers", "textvqa_accuracy")]
    return leave_one_out_accuracy(evalai_normalize(prediction), golds)


def exact_match(prediction: str, answers) -> float:
    """gapcache's rule for datasets without an lmms-eval task (synthetic, manifest, ScienceQA letters):
    1.0 iff the prediction equals some gold after lowercasing and stripping each, else 0.0."""
    golds = {g.strip().lower() for g in gold_list(answers, "answers", "exact_match")}
    return 1.0 if prediction.strip().lower() in golds else 0.0


# ----------------------------------------------------------------------------------- dispatch

def _chartqa(prediction: str, golds) -> float:
    target = golds if isinstance(golds, str) else gold_list(golds, "golds", "score_generation('chartqa', ...)")[0]
    return relaxed_accuracy(prediction, target)


_SCORERS = {"chartqa": _chartqa, "docvqa": anls, "vqav2": vqa_accuracy, "textvqa": textvqa_accuracy,
            "exact": exact_match}


def score_generation(task: str, prediction: str, golds) -> float:
    """One generation's score under ``task``, the prediction stripped first (as lmms-eval does).

    ``golds``: the list of gold answers (chartqa also takes one string, and scores the first gold).
    """
    if task not in _SCORERS:
        raise ConfigError(
            f"The 'task' parameter of score_generation must be one of {list(TASKS)}. Got {task!r} instead."
        )
    if task != "chartqa":
        golds = gold_list(golds, "golds", f"score_generation({task!r}, ...)")
    return float(_SCORERS[task](str(prediction).strip(), golds))


def score_generations(task, predictions, golds) -> np.ndarray:
    """Scores of many generations (sample,) -> float array (sample,). ``task``: one name, or one per sample."""
    predictions = list(np.asarray(predictions, dtype=object).ravel())
    if isinstance(golds, str):
        raise ConfigError("The 'golds' parameter of score_generations must hold one entry (a list of gold "
                          f"answers) per prediction. Got the string {golds!r} instead.")
    golds = list(golds)
    if len(golds) != len(predictions):
        raise ConfigError(f"The 'golds' parameter of score_generations must have one entry per prediction "
                          f"({len(predictions)}). Got {len(golds)} instead.")
    tasks = [task] * len(predictions) if isinstance(task, str) else list(task)
    if len(tasks) != len(predictions):
        raise ConfigError(f"The 'task' parameter of score_generations must be one name or one per prediction "
                          f"({len(predictions)}). Got {len(tasks)} instead.")
    return np.array([score_generation(t, p, g) for t, p, g in zip(tasks, predictions, golds)], dtype=np.float64)


def task_for_dataset(name: str) -> str:
    """The scoring task of a dataset name (:data:`DATASET_TASKS`; "exact" for any other)."""
    return DATASET_TASKS.get(str(name), "exact")


def has_generations(ds) -> bool:
    """Whether the store's run generated (its config's ``extract.generate.enabled``; a store without the
    recorded config: any non-empty generation). The ``generation`` array exists in every store."""
    if "generation" not in ds:
        return False
    enabled = ((ds.attrs.get("config") or {}).get("extract") or {}).get("generate", {}).get("enabled")
    if enabled is not None:
        return bool(enabled)
    return any(str(g) for g in np.asarray(ds["generation"].values, dtype=object).ravel())


def score_store(ds, tasks: dict | None = None):
    """Every condition's generation scored: DataArray (condition, sample), NaN where not written / failed.

    ``ds``: the store's view (``gapcache.store.open_store``) with a ``generation`` variable. The task of
    each sample comes from its ``dataset_name`` (:func:`task_for_dataset`; ``tasks`` overrides it per
    dataset name, e.g. ``{"manifest": "vqav2"}``); the golds are every stored gold answer
    (``answers``; stores made before it was recorded fall back to the one ``answer``). A sample
    scores only where ``status`` is done (1); an empty generation scores as the empty string.
    """
    import xarray as xr

    from gapcache.store.reader import gold_answers

    if not has_generations(ds):
        raise ConfigError("score_store needs a store with generations (extract.generate.enabled: true). "
                          "This store was extracted without them.")
    golds = gold_answers(ds)
    n = ds.sizes["sample"]
    names = (np.asarray(ds["dataset_name"].values, dtype=object).ravel() if "dataset_name" in ds
             else np.array([""] * n, dtype=object))
    override = dict(tasks or {})
    task = [override.get(str(d), task_for_dataset(d)) for d in names]
    bad = sorted({t for t in task if t not in _SCORERS})
    if bad:
        raise ConfigError(f"The 'tasks' parameter of score_store must map dataset names to tasks in "
                          f"{list(TASKS)}. Got {bad} instead.")
    gen = np.asarray(ds["generation"].values, dtype=object)
    done = np.asarray(ds["status"].values) == 1
    out = np.full(gen.shape, np.nan)
    for k in range(gen.shape[0]):
        for i in np.flatnonzero(done[k]):
            if golds[i]:
                out[k, i] = score_generation(task[i], "" if gen[k, i] is None else str(gen[k, i]), golds[i])
    coords = {"condition": [str(c) for c in ds["condition"].values], "sample": [str(s) for s in ds["sample"].values]}
    return xr.DataArray(out, dims=("condition", "sample"), coords=coords, name="generation_score",
                        attrs={"tasks": sorted(set(task)), "rule": "lmms-eval HEAD (gapcache.analyze.scoring)"})


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
