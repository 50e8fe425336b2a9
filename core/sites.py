"""Token sites as a registry: name -> finder of a position, or of a span (start, length), in a
processed prompt (DESIGN.md, "Token sites"; found per sample, never from the first one).

Usage::

    ctx = SiteContext(sample_id, ids, offsets, special_ids, image_token_id, image_token,
                      n_image_tokens, prompt, question, adapter, question_start)
    sites = {}
    find_sites(ctx, sites)    # {"visual": (start, length), "instruction": 41, "prediction": 47}
    position_row(sites)       # [41, 47]: the position sites in registry order (the store's ``site`` axis)

Finders run in registry order and see the sites found before them (the instruction needs the
visual span's length to map the question into the processed text). A finder raises ``SiteError``
when its site is missing or inconsistent; the sample is then recorded as failed. Adding a site is
one ``Site`` entry in ``SITES``: the store's ``site`` axis (``gapcache.store.schema.SITES``) is the
position sites in registry order, and a span site's rows are stored by the store's span of the same
name (``gapcache.store.arrays.SPANS``). Torch-free: both tiers read it.

Rules:
* visual: the contiguous run of the model's image token; its length must equal the number of
  image embeddings the model inserts;
* instruction: the last non-special token overlapping the question's characters whose overlap is
  not whitespace-only ("Is the sky blue?   " -> '?', not the trailing '   '). The question is
  located by where the chat template puts the user's text (``question_start``, from
  ``Planner.question_start``: the template rendered around a sentinel), mapped into the processed
  text by the adapter (``question_char_span``) and matched against the tokenizer's offsets; the
  prompt is never searched for the question, so a question ``assistant`` stays in the user turn;
* prediction: the last prompt token (end of the generation prompt), whose next-token
  distribution predicts the first answer token. Never an answer token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gapcache.errors import SiteError

POSITION, SPAN = "position", "span"
#: roles of the prompt text tokens the token span records (extract.text: all): a special or template token of
#: the tokenizer, a token of the question's content span (site "question"), other template text
TOKEN_ROLES = ("template", "question", "special")


@dataclass(frozen=True)
class SiteContext:
    """What a finder may read about one processed prompt (batch row 0, no padding)."""

    sample_id: str
    ids: list  # input_ids
    offsets: list  # (start, end) character offsets of each token in the processed text
    special_ids: set  # special and template token ids (image token included)
    image_token_id: int
    image_token: str
    n_image_tokens: int  # image embeddings the model inserts (adapter.n_image_tokens)
    prompt: str  # the chat-templated prompt before the processor expanded the image placeholder
    question: str
    adapter: object  # the family adapter (question_char_span)
    #: character offset of ``question`` in ``prompt`` (the user turn's text as the template placed it;
    #: ``question`` is then that text exactly); None: unknown, the instruction site is not found
    question_start: int | None = None


@dataclass(frozen=True)
class Site:
    """One token site: ``find(ctx, found)`` -> int position (kind POSITION) or (start, length) (SPAN)."""

    name: str
    kind: str
    find: Callable[[SiteContext, dict], int | tuple[int, int]]
    doc: str

    @property
    def missing(self) -> int | tuple[int, int]:
        """Value recorded for a sample whose site was not found (failed at plan time)."""
        return -1 if self.kind == POSITION else (-1, 0)


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


def find_instruction(offsets, ids, special_ids, q_start: int, question: str, sample_id: str) -> int:
    """Last non-special token overlapping ``question`` (which starts at character ``q_start`` of the
    processed text) whose overlap with it is not whitespace-only."""
    q_end = q_start + len(question)
    best = -1
    for i, (start, end) in enumerate(offsets):
        if end > start and start < q_end and end > q_start and int(ids[i]) not in special_ids:
            if question[max(start, q_start) - q_start : min(end, q_end) - q_start].strip():
                best = i
    if best < 0:
        raise SiteError(sample_id, "no content token of the question found in the prompt")
    return best


def find_question_tokens(offsets, ids, special_ids, q_start: int, question: str, sample_id: str) -> tuple[int, int]:
    """(start, length) from the first to the last non-special token overlapping ``question`` (starting at
    character ``q_start`` of the processed text) whose overlap with it is not whitespace-only."""
    q_end = q_start + len(question)
    hits = [i for i, (start, end) in enumerate(offsets)
            if end > start and start < q_end and end > q_start and int(ids[i]) not in special_ids
            and question[max(start, q_start) - q_start : min(end, q_end) - q_start].strip()]
    if not hits:
        raise SiteError(sample_id, "no content token of the question found in the prompt")
    return hits[0], hits[-1] - hits[0] + 1


def _question_start(ctx: SiteContext, found: dict) -> int:
    """Character where the question starts in the processed text (image placeholder expanded)."""
    if ctx.question_start is None:
        raise SiteError(ctx.sample_id, "the question's place in the prompt is unknown (SiteContext.question_start)")
    q_start, _ = ctx.adapter.question_char_span(ctx.prompt, ctx.question_start, len(ctx.question),
                                                found["visual"][1], ctx.image_token)
    return q_start



def _visual(ctx: SiteContext, found: dict) -> tuple[int, int]:
    return find_visual_span(ctx.ids, ctx.image_token_id, ctx.n_image_tokens, ctx.sample_id)


def _instruction(ctx: SiteContext, found: dict) -> int:
    return find_instruction(ctx.offsets, ctx.ids, ctx.special_ids, _question_start(ctx, found), ctx.question,
                            ctx.sample_id)


def _question(ctx: SiteContext, found: dict) -> tuple[int, int]:
    return find_question_tokens(ctx.offsets, ctx.ids, ctx.special_ids, _question_start(ctx, found), ctx.question,
                                ctx.sample_id)


def _prediction(ctx: SiteContext, found: dict) -> int:
    return len(ctx.ids) - 1


SITES: dict[str, Site] = {s.name: s for s in (
    Site("visual", SPAN, _visual, "the image-embedding positions"),
    Site("instruction", POSITION, _instruction,
         "the last non-whitespace content token of the question, located in the user turn"),
    Site("prediction", POSITION, _prediction, "the end of the generation prompt (predicts the first answer token)"),
    Site("question", SPAN, _question, "the question's content tokens, first to last (the text channel; token roles)"),
)}

POSITION_SITES: tuple[str, ...] = tuple(n for n, s in SITES.items() if s.kind == POSITION)
SPAN_SITES: tuple[str, ...] = tuple(n for n, s in SITES.items() if s.kind == SPAN)


def find_sites(ctx: SiteContext, found: dict) -> dict:
    """Run every finder in registry order, adding each result to ``found`` as it is found (so a
    sample failing at a later site keeps the earlier ones, as recorded in the store); returns ``found``.
    Raises the first finder's SiteError."""
    for name, site in SITES.items():
        found[name] = site.find(ctx, found)
    return found


def site_value(sites: dict, name: str):
    """``sites[name]``, or the site's ``missing`` value when it was not found."""
    return sites.get(name, SITES[name].missing)


def position_row(sites: dict) -> list[int]:
    """The position sites of one sample in registry order (-1 where missing): a row of ``site_position``."""
    return [int(site_value(sites, name)) for name in POSITION_SITES]
