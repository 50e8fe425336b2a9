"""Planning pass: everything about a run that needs the processor but not the model's forward.

For each sample: load and hash the image, build the prompt with the chat template, process it,
find and validate the token sites (per sample, never from the first one), tokenize the gold answer.
Across samples: the candidate set and its token ids, the mean RGB (``blind_mean``) and the
derangement (``blind_randomimage``). A sample that fails here is recorded as failed with its
reason; the run goes on.

The sites come from the site registry (``gapcache.sites``); family specifics (how many
image embeddings, where the question lands after the processor expanded the image placeholder)
from the family adapter. The planner itself knows neither sites nor families.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from gapcache.errors import ConfigError, SampleError, SiteError
from gapcache.extract.data import Sample, derangement, pixel_sum
from gapcache.sites import SiteContext, find_sites, site_value
from gapcache.variants import surface_variants


#: stands for the question when the chat template is rendered to find where the user's text goes
QUESTION_SENTINEL = "\ue000gapcache-question\ue001"


@dataclass
class PlannedSample:
    index: int
    sample: Sample
    prompt: str = ""
    prompt_ids: list = field(default_factory=list)
    sites: dict = field(default_factory=dict)  # site name -> position (int) or span (start, length)
    answer_ids: list = field(default_factory=list)
    image_sha256: str = ""
    image_size: tuple = (0, 0)
    failure: str = ""
    cand_prefix: int = 0  # tokens shared by all of the sample's candidates
    cand_columns: list = field(default_factory=list)  # columns of the sample's candidates in the store
    cand_tokens: list = field(default_factory=list)  # their first distinguishing token ids (the lens; [] if none)
    cand_seqs: list = field(default_factory=list)  # every candidate variant's full token ids (answer prefix included)
    cand_owner: list = field(default_factory=list)  # per cand_seqs entry: its candidate (index into cand_columns)
    cand_extra: list = field(default_factory=list)  # indices into cand_seqs scored by the extra forward
    pixel_sum: tuple | None = None  # data.pixel_sum of the image (blind_mean's mean without decoding it again)

    @property
    def ok(self) -> bool:
        return not self.failure

    @property
    def visual_start(self) -> int:
        return int(site_value(self.sites, "visual")[0])

    @property
    def visual_length(self) -> int:
        return int(site_value(self.sites, "visual")[1])

    @property
    def question_span(self) -> tuple[int, int]:
        """[start, end) positions of the question's content tokens (the site "question"; (0, 0) if unknown)."""
        start, n = self.sites.get("question", (0, 0))
        return (int(start), int(start) + int(n)) if start >= 0 else (0, 0)

    @property
    def instruction(self) -> int:
        return int(site_value(self.sites, "instruction"))

    @property
    def prediction(self) -> int:
        return int(site_value(self.sites, "prediction"))


def image_sha256(image) -> str:
    """sha256 of the decoded RGB pixels and the size (independent of the file encoding)."""
    h = hashlib.sha256(f"{image.size[0]}x{image.size[1]}:".encode())
    h.update(np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes())
    return h.hexdigest()


class Planner:
    """Builds PlannedSamples for one (adapter, model, processor)."""

    def __init__(self, adapter, model, processor, max_length: int):
        self.adapter, self.model, self.processor = adapter, model, processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.image_token_id = adapter.image_token_id(model)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.special_ids = set(self.tokenizer.all_special_ids) | {self.image_token_id}

    def prompt(self, question: str) -> str:
        return self.processor.apply_chat_template(
            self.adapter.messages(question), add_generation_prompt=True, tokenize=False
        )

    def question_start(self, prompt: str, question: str) -> tuple[int, str]:
        """(character offset, text) of the question in ``prompt`` as the chat template placed it.

        The template is rendered once more with a sentinel in place of the question; the text before
        the sentinel is the prompt's prefix up to the user's text, so the question is located without
        searching the prompt (a question ``assistant`` is not confused with the template's
        ``assistant``). A template that trims the text is allowed (the trimmed text is returned);
        one that repeats, drops or otherwise rewrites it fails the sample.
        """
        if getattr(self, "_marked", None) is None:
            self._marked = self.prompt(QUESTION_SENTINEL)  # the same for every question: rendered once
        marked = self._marked
        if marked.count(QUESTION_SENTINEL) != 1:
            raise SiteError("", f"the chat template shows the question {marked.count(QUESTION_SENTINEL)} times "
                                "(expected once); cannot locate the instruction site")
        head, tail = marked.split(QUESTION_SENTINEL)
        for shown in dict.fromkeys((question, question.rstrip(), question.strip(), question.lstrip())):
            if prompt == head + shown + tail:
                return len(head), shown
        raise SiteError("", "the chat template rewrites the question text; cannot locate the instruction site")

    def encode_answer(self, text: str) -> list:
        return self.tokenizer(self.adapter.answer_prefix + text, add_special_tokens=False)["input_ids"]

    def plan(self, index: int, sample: Sample) -> PlannedSample:
        ps = PlannedSample(index, sample)
        try:
            self._plan(ps)
        except SampleError as err:
            ps.failure = err.reason
        return ps

    def _plan(self, ps: PlannedSample):
        s = ps.sample
        if not s.question.strip():
            raise SampleError(s.id, "question is empty")
        if not s.answer.strip():
            raise SampleError(s.id, "gold answer is empty")
        image = s.load_image()
        ps.image_sha256, ps.image_size, ps.pixel_sum = image_sha256(image), image.size, pixel_sum(image)
        ps.prompt = self.prompt(s.question)
        try:
            q_start, q_text = self.question_start(ps.prompt, s.question)
        except SiteError as err:
            raise SampleError(s.id, err.reason) from None
        inputs = self.processor(text=[ps.prompt], images=[image], return_tensors="pt",
                                return_offsets_mapping=True)
        ids = inputs["input_ids"][0].tolist()
        ctx = SiteContext(
            sample_id=s.id, ids=ids, offsets=inputs["offset_mapping"][0].tolist(), special_ids=self.special_ids,
            image_token_id=self.image_token_id, image_token=self.image_token,
            n_image_tokens=self.adapter.n_image_tokens(self.model, inputs, 0), prompt=ps.prompt,
            question=q_text, adapter=self.adapter, question_start=q_start,
        )
        find_sites(ctx, ps.sites)
        ps.prompt_ids = ids
        ps.answer_ids = self.encode_answer(s.answer)
        if not ps.answer_ids:
            raise SampleError(s.id, f"gold answer {s.answer!r} tokenizes to nothing")
        total = len(ids) + len(ps.answer_ids)
        if total > self.max_length:
            raise SampleError(s.id, f"prompt + answer is {total} tokens, above extract.max_length={self.max_length}")


def candidate_table(planner: Planner, planned, rules=()) -> tuple[tuple[str, ...], np.ndarray]:
    """(all candidates, mask (sample, candidate) of each sample's own set); sets each sample's scoring.

    A candidate's score is exact whatever its tokenization: the teacher-forced log-prob of its full
    continuation, sum_t log p(c_t | prompt, c_<t). Where the candidate's tokens before its last one
    are a prefix of the gold answer's, that sum is read from the gold answer's teacher-forced forward
    (no extra cost: yes/no, digits, letters, single-token words, Llama-style "_" + digit); the others
    (``cand_extra``: "10" = ['1', '0'] when the gold is "3", "red car") are scored by one extra
    forward of prompt + candidate rows under the same condition (``Extraction.forward``), batched.
    No sample fails because of its candidate set.

    ``rules`` (``extract.candidate_variants``, see ``gapcache.variants``): each candidate's surface
    variants are scored the same way and pooled by logsumexp (``cand_seqs`` holds every variant's ids,
    ``cand_owner`` the candidate each belongs to; the as-written candidate first).

    For the logit lens, ``cand_prefix`` / ``cand_tokens`` keep the first distinguishing token after the
    candidates' shared prefix (as written) when every candidate has one and the gold answer starts with
    that prefix (else ``cand_tokens`` is empty and the sample has no lens rows).
    """
    cands = tuple(sorted({c for p in planned for c in p.sample.candidates}))
    table = variant_table(planner, cands, rules)
    mask = np.zeros((len(planned), len(cands)), bool)
    for p in planned:
        own = [cands.index(c) for c in p.sample.candidates]
        mask[p.index, own] = True
        if own and p.ok:
            _candidate_scoring(p, [[ids for _, ids in table[cands[j]]] for j in own], own)
    return cands, mask


def variant_table(planner: Planner, cands, rules=()) -> dict[str, list[tuple[str, list]]]:
    """candidate -> [(variant text, token ids)], the as-written candidate first, variants with equal ids
    kept once. A ConfigError when a candidate tokenizes to nothing or two candidates share a variant."""
    empty = [c for c in cands if not planner.encode_answer(c)]
    if empty:
        raise ConfigError(f"Candidate answers {empty} tokenize to nothing.")
    table, owner = {}, {}
    for c in cands:
        table[c] = []
        for v in surface_variants(c, rules):
            ids = planner.encode_answer(v)
            key = tuple(ids)
            if key in owner and owner[key][0] != c:
                raise ConfigError(
                    f"Candidates {owner[key][0]!r} and {c!r} share the surface variant {v!r} (token ids {list(ids)}) "
                    f"under extract.candidate_variants {list(rules)}: their pooled scores could not be told apart. "
                    "List only one of them as a candidate, or drop the rule.")
            if key not in owner:
                owner[key] = (c, v)
                table[c].append((v, list(ids)))
    return table


def shared_prefix(seqs: list) -> int:
    """Number of leading tokens all of ``seqs`` (token-id lists) share."""
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def read_from_gold(seq: list, answer_ids: list) -> bool:
    """True when the gold answer's teacher-forced forward gives every factor of log p(seq)."""
    return len(seq) <= len(answer_ids) and list(seq[:-1]) == list(answer_ids[: len(seq) - 1])


def _candidate_scoring(p: PlannedSample, groups: list, columns: list):
    """``groups[k]``: the token-id lists of candidate k's variants (its as-written ids first)."""
    p.cand_columns = columns
    p.cand_seqs = [list(s) for g in groups for s in g]
    p.cand_owner = [k for k, g in enumerate(groups) for _ in g]
    p.cand_extra = [j for j, s in enumerate(p.cand_seqs) if not read_from_gold(s, p.answer_ids)]
    seqs = [g[0] for g in groups]
    n = shared_prefix(seqs)
    heads = [s[n] if len(s) > n else None for s in seqs]
    if None not in heads and len(set(heads)) == len(heads) and p.answer_ids[:n] == seqs[0][:n] \
            and len(p.answer_ids) > n:
        p.cand_prefix, p.cand_tokens = n, heads
    else:
        p.cand_prefix, p.cand_tokens = n, []


def donors(planned: list[PlannedSample], seed: int) -> np.ndarray:
    """donor[i] = index of the sample whose image replaces i's under blind_randomimage (-1: none).

    A derangement over the samples whose image loaded, so no sample ever sees its own image.
    """
    ok = np.array([p.index for p in planned if p.ok])
    out = np.full(len(planned), -1, np.int64)
    if ok.size >= 2:
        out[ok] = ok[derangement(int(ok.size), seed)]
    return out
