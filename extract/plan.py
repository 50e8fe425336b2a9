"""Planning pass: everything about a run that needs the processor but not the model's forward.

For each sample: load and hash the image, build the prompt with the chat template, process it,
find and validate the token sites (per sample, never from the first one), tokenize the gold answer.
Across samples: the candidate set and its token ids, the mean RGB (``blind_mean``) and the
derangement (``blind_randomimage``). A sample that fails here is recorded as failed with its
reason; the run goes on.

Site rules (DESIGN.md, "Token sites"):
* visual: the contiguous run of the model's image token; its length must equal the number of
  image embeddings the model inserts;
* instruction: the last non-special token overlapping the question text in the user turn;
* prediction: the last prompt token (end of the generation prompt), whose next-token
  distribution predicts the first answer token. Never an answer token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from gapcache.errors import ConfigError, SampleError, SiteError
from gapcache.extract.data import Sample, derangement, pixel_sum


@dataclass
class PlannedSample:
    index: int
    sample: Sample
    prompt: str = ""
    prompt_ids: list = field(default_factory=list)
    visual_start: int = -1
    visual_length: int = 0
    instruction: int = -1
    prediction: int = -1
    answer_ids: list = field(default_factory=list)
    image_sha256: str = ""
    image_size: tuple = (0, 0)
    failure: str = ""
    cand_prefix: int = 0  # tokens shared by all of the sample's candidates
    cand_columns: list = field(default_factory=list)  # columns of the sample's candidates in the store
    cand_tokens: list = field(default_factory=list)  # their first distinguishing token ids
    pixel_sum: tuple | None = None  # data.pixel_sum of the image (blind_mean's mean without decoding it again)

    @property
    def ok(self) -> bool:
        return not self.failure


def image_sha256(image) -> str:
    """sha256 of the decoded RGB pixels and the size (independent of the file encoding)."""
    h = hashlib.sha256(f"{image.size[0]}x{image.size[1]}:".encode())
    h.update(np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes())
    return h.hexdigest()


def find_visual_span(ids, image_token_id: int, expected: int, sample_id: str) -> tuple[int, int]:
    """(start, length) of the image-token run; SiteError if empty, split or of the wrong length."""
    pos = np.flatnonzero(np.asarray(ids) == image_token_id)
    if pos.size == 0:
        raise SiteError(sample_id, f"no image token (id {image_token_id}) in the processed prompt")
    if pos[-1] - pos[0] + 1 != pos.size:
        raise SiteError(sample_id, f"image tokens are not one contiguous span (positions {pos[0]}..{pos[-1]}, "
                                   f"{pos.size} tokens); one image per sample is supported")
    if pos.size != expected:
        raise SiteError(sample_id, f"visual span has {pos.size} tokens but the model inserts {expected} "
                                   "image embeddings; processor and model config disagree")
    if pos[-1] >= len(ids):
        raise SiteError(sample_id, "visual span runs past the end of the sequence")
    return int(pos[0]), int(pos.size)


def find_instruction(offsets, ids, special_ids, q_end: int, sample_id: str) -> int:
    """Last non-special token whose characters start before the question's end."""
    best = -1
    for i, (start, end) in enumerate(offsets):
        if end > start and start < q_end and int(ids[i]) not in special_ids:
            best = i
    if best < 0:
        raise SiteError(sample_id, "no content token of the question found in the prompt")
    return best


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
        inputs = self.processor(text=[ps.prompt], images=[image], return_tensors="pt",
                                return_offsets_mapping=True)
        ids = inputs["input_ids"][0].tolist()
        expected = self.adapter.n_image_tokens(self.model, inputs, 0)
        ps.visual_start, ps.visual_length = find_visual_span(ids, self.image_token_id, expected, s.id)
        q_end = ps.prompt.rfind(s.question) + len(s.question)
        shift = (ps.visual_length - 1) * len(self.image_token)  # placeholder expanded by the processor
        offsets = inputs["offset_mapping"][0].tolist()
        ps.instruction = find_instruction(offsets, ids, self.special_ids, q_end + shift, s.id)
        ps.prediction = len(ids) - 1
        ps.prompt_ids = ids
        ps.answer_ids = self.encode_answer(s.answer)
        if not ps.answer_ids:
            raise SampleError(s.id, f"gold answer {s.answer!r} tokenizes to nothing")
        total = len(ids) + len(ps.answer_ids)
        if total > self.max_length:
            raise SampleError(s.id, f"prompt + answer is {total} tokens, above extract.max_length={self.max_length}")


def candidate_table(planner: Planner, planned) -> tuple[tuple[str, ...], np.ndarray]:
    """(all candidates, mask (sample, candidate) of each sample's own set); sets each sample's scoring.

    A candidate's score is log p(shared prefix) + log p(its first distinguishing token), read from
    the teacher-forced gold answer: with Llama-style tokenizers " 3" is ["_", "3"], so the digits
    share the first token and differ at the second. Exact when every candidate is the shared
    prefix plus one token (yes/no, digits, letters, single-token words); otherwise later tokens
    are ignored (recorded in the store). The gold answer must start with the shared prefix.
    """
    cands = tuple(sorted({c for p in planned for c in p.sample.candidates}))
    ids = {c: planner.encode_answer(c) for c in cands}
    empty = [c for c in cands if not ids[c]]
    if empty:
        raise ConfigError(f"Candidate answers {empty} tokenize to nothing.")
    mask = np.zeros((len(planned), len(cands)), bool)
    for p in planned:
        own = [cands.index(c) for c in p.sample.candidates]
        mask[p.index, own] = True
        if own and p.ok:
            _candidate_scoring(p, [ids[cands[j]] for j in own], own)
    return cands, mask


def shared_prefix(seqs: list) -> int:
    """Number of leading tokens all of ``seqs`` (token-id lists) share."""
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def _candidate_scoring(p: PlannedSample, seqs: list, columns: list):
    n = shared_prefix(seqs)
    heads = [s[n] if len(s) > n else None for s in seqs]
    if None in heads or len(set(heads)) != len(heads):
        p.failure = (f"candidates {list(p.sample.candidates)} cannot be told apart by one token after their "
                     "shared prefix (one is a prefix of another)")
        return
    if p.answer_ids[:n] != seqs[0][:n] or len(p.answer_ids) <= n:
        p.failure = f"gold answer {p.sample.answer!r} does not start with the candidates' shared prefix"
        return
    p.cand_prefix, p.cand_columns, p.cand_tokens = n, columns, heads


def donors(planned: list[PlannedSample], seed: int) -> np.ndarray:
    """donor[i] = index of the sample whose image replaces i's under blind_randomimage (-1: none).

    A derangement over the samples whose image loaded, so no sample ever sees its own image.
    """
    ok = np.array([p.index for p in planned if p.ok])
    out = np.full(len(planned), -1, np.int64)
    if ok.size >= 2:
        out[ok] = ok[derangement(int(ok.size), seed)]
    return out
