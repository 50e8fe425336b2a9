"""Tiny, random-weight, fully offline VLM checkpoints for tests.

`build_tiny_checkpoint` writes a complete checkpoint directory (config.json,
model.safetensors, tokenizer files, image/video processor config, chat template)
for one of the supported families, small enough (tens of KB, ~1 s to build) to
run the *real* transformers loading path on a laptop CPU:

    >>> from gapcache.extract.tiny import build_tiny_checkpoint
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> path = build_tiny_checkpoint("qwen2_vl", "/tmp/tiny-qwen2vl", seed=0)
    >>> model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    >>> proc = AutoProcessor.from_pretrained(path)
    >>> msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a red circle?"}]}]
    >>> text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    >>> batch = proc(text=[text], images=[pil_image], return_tensors="pt", padding=True)
    >>> out = model(**batch, output_hidden_states=True)

Family facts (defaults):

* ``llava``: LlavaForConditionalGeneration, CLIP tower (32 px, patch 8) -> always 16
  ``<image>`` tokens; LLaVA-1.5-hf prompt ``<s>USER: <image>\\n{q} ASSISTANT:``.
* ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl`` / ``qwen3_vl_moe``: patch 8, merge 2
  (one visual token per 16x16 px), min 4 / max 64 visual tokens, so a 64x64 image gives
  16 ``<|image_pad|>`` tokens and a 96x64 image 24 (dynamic resolution is kept).
  Qwen3-VL families have one deepstack level (vision block 0 -> added after text layer 0).

Each family's tokenizer, config and processor are chosen by its adapter's ``build_tiny``
(``gapcache.extract.families``), from the family-neutral helpers of this module.

The weights are random (seeded); ``config.vocab_size`` is the tokenizer length rounded up
to a multiple of 64, as in real checkpoints (logit columns >= len(tokenizer)).

Overrides: ``text_config={...}``, ``vision_config={...}``, ``image_processor={...}``
update the family defaults; any other keyword goes to the top-level model config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gapcache.errors import ConfigError
from gapcache.extract.families import ADAPTERS

FAMILIES = tuple(ADAPTERS)  # every registered family builds a tiny checkpoint (its adapter's build_tiny)

# Qwen2's pre-tokenizer split regex (transformers/models/qwen2/tokenization_qwen2.py):
# training with the same pre-tokenizer keeps the merges valid when Qwen2Tokenizer rebuilds it.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_DEFAULT_CORPUS = (
    "Is there a red circle? Is there a blue square? Is there a green triangle?",
    "Yes. No. yes no The answer is yes. The answer is no.",
    "What color is the circle? red blue green yellow black white orange purple gray",
    "How many objects are in the image? one two three four five six seven eight nine ten",
    "What is the value of the highest bar in the chart? What is the title of the document?",
    "What does the sign say? Which year had the largest value? What is written on the page?",
    "USER: ASSISTANT: USER: ASSISTANT: USER: ASSISTANT: You are a helpful assistant.",
    "user\nassistant\nsystem\nuser\nassistant\nsystem\nuser\nassistant\nsystem\n",
    "Answer the question using a single word or phrase.",
    "left right top bottom above below image picture photo chart table text number",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 2019 2020 2021 2022 2023 percent % $",
)

# Real special tokens, in the real checkpoints' order (ids differ: they follow our tiny BPE vocab).
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN3_EXTRA_SPECIALS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

# llava-hf/llava-1.5-7b-hf chat_template.json
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct chat_template (default system prompt).
QWEN2_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value "
    "+ 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|>"
    "<|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen3-VL-*-Instruct chat_template without the tool-calling branches (no default system
# prompt); renders plain system/user/assistant conversations exactly like the real one.
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].content is string %}{{- messages[0].content }}{%- else %}
        {%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if message.role == "user" and (content.type == 'image' or 'image' in content or 'image_url' in content) %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif message.role == "user" and (content.type == 'video' or 'video' in content) %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


# --------------------------------------------------------------------------- tokenizer


def _train_bpe(corpus: list[str], special_tokens: list[str], vocab_size: int):
    """Train a byte-level BPE `tokenizers.Tokenizer` (Qwen2 pre-tokenizer); specials appended last."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_base = max(vocab_size - len(special_tokens), 257)  # 256 byte symbols always present
    trainer = trainers.BpeTrainer(
        vocab_size=n_base, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(list(special_tokens))
    return tok


def build_tokenizer(
    corpus: Iterable[str],
    special_tokens: list[str],
    vocab_size: int = 512,
    seed: int = 0,
    *,
    pad_token: str | None = None,
):
    """Train a deterministic byte-level BPE and wrap it as a transformers fast tokenizer.

    Any text encodes (256 byte symbols are in the vocab); frequent corpus words get merged into
    few tokens. `special_tokens` are appended after the BPE vocab (never split). `pad_token`
    defaults to the first special token. BPE training has no randomness: `seed` is accepted for
    API symmetry and does not change the result.
    Returns a `transformers.PreTrainedTokenizerFast` (an alias of `TokenizersBackend` in 5.x).
    """
    from transformers import PreTrainedTokenizerFast

    del seed  # BPE training is deterministic
    specials = list(dict.fromkeys(special_tokens))
    backend = _train_bpe([str(t) for t in corpus], specials, vocab_size)
    pad = pad_token if pad_token is not None else (specials[0] if specials else None)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, extra_special_tokens=specials)


def qwen_tokenizer(corpus: list[str], specials: list[str], vocab_size: int):
    """A real `Qwen2Tokenizer` (what Qwen-VL checkpoints load as) over our trained BPE."""
    from transformers import Qwen2Tokenizer

    fast = build_tokenizer(corpus, specials, vocab_size)
    model = json.loads(fast.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # eos starts as <|endoftext|> so that ids follow the real order (endoftext, im_start, im_end, ...);
    # the Instruct checkpoints' eos is <|im_end|>.
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None, eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", extra_special_tokens=[t for t in specials if t != "<|endoftext|>"],
    )
    tok.eos_token = "<|im_end|>"
    return tok


def llava_tokenizer(corpus: list[str], vocab_size: int):
    """LLaVA-1.5-hf style tokenizer: BOS `<s>` prepended, `<image>` and `<pad>` specials."""
    from transformers import PreTrainedTokenizerFast

    backend = _train_bpe(corpus, LLAVA_SPECIALS, vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens=["<image>"], add_bos_token=True, add_eos_token=False, padding_side="left",
    )
    return tok


# --------------------------------------------------------------------------- configs


def _round_vocab(n: int, multiple: int = 64) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def _token_ids(tok, names: dict[str, str]) -> dict[str, int]:
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}
    bad = {k: v for k, v in ids.items() if v is None or v == tok.unk_token_id}
    if bad:
        raise RuntimeError(f"special tokens missing from tiny tokenizer: {bad}")
    return ids


def _text_common(hidden: int, layers: int, vocab: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        initializer_range=0.02, dtype="float32",
    )


def llava_config(tok, hidden: int, layers: int) -> dict[str, Any]:
    ids = _token_ids(tok, {"image": "<image>", "pad": "<pad>", "bos": "<s>", "eos": "</s>"})
    text = _text_common(hidden, layers, _round_vocab(len(tok)))
    text.update(model_type="llama", num_key_value_heads=2, pad_token_id=ids["pad"],
                bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    return dict(text_config=text, vision_config=vision, image_token_index=ids["image"], image_seq_length=16,
                vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=ids["pad"])


def _qwen_ids(tok) -> dict[str, int]:
    return _token_ids(tok, {
        "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
        "pad": "<|endoftext|>", "eos": "<|im_end|>", "bos": "<|endoftext|>",
    })


def qwen_config(tok, hidden: int, layers: int, family_update) -> dict[str, Any]:
    """The config shared by the Qwen-VL families; ``family_update(text, vision, head_dim, section)``
    adds the family's own keys (rope, vision tower, MoE) to the two dicts in place."""
    ids = _qwen_ids(tok)
    text = _text_common(hidden, layers, _round_vocab(len(tok)))
    text.update(pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    head_dim = hidden // text["num_attention_heads"]
    section = mrope_section(head_dim)
    vis: dict[str, Any] = dict(depth=2, num_heads=2, in_channels=3, patch_size=8, spatial_merge_size=2,
                               temporal_patch_size=2, initializer_range=0.02)
    family_update(text, vis, head_dim, section)
    top = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return dict(text_config=text, vision_config=vis, tie_word_embeddings=False, **top)


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (t, h, w) like the real [16, 24, 24] of 64."""
    half = head_dim // 2
    hw = (3 * half) // 8
    return [half - 2 * hw, hw, hw]


def _merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    out.update(extra or {})
    return out


def _make_config(family: str, cfg: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **cfg)


# --------------------------------------------------------------------------- processors


CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def qwen_processor(tok, image_overrides: dict[str, Any] | None, *, mean, std, processor_cls, video_cls,
                   chat_template: str):
    """Processor with patch 8, merge 2: one visual token per 16x16 px, between 4 and 64 tokens.

    The family picks the normalization (``mean``, ``std``), the processor and video-processor
    classes and the chat template."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    factor = 8 * 2
    img_kwargs = _merge(dict(
        size={"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor},
        patch_size=8, merge_size=2, temporal_patch_size=2, image_mean=mean, image_std=std,
    ), image_overrides)
    image_processor = Qwen2VLImageProcessor(**img_kwargs)
    vid_kwargs = dict(size={"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor},
                      patch_size=8, merge_size=2, temporal_patch_size=2, image_mean=mean, image_std=std)
    video = video_cls(**vid_kwargs)
    return processor_cls(image_processor=image_processor, tokenizer=tok, video_processor=video,
                         chat_template=chat_template)


def llava_processor(tok, image_overrides: dict[str, Any] | None):
    """CLIP preprocessing at 32 px, patch 8: 16 `<image>` tokens (CLS dropped, 'default' strategy)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(**_merge(dict(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        do_center_crop=True, do_resize=True, do_normalize=True,
    ), image_overrides))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE, image_token="<image>")


# --------------------------------------------------------------------------- model


def _build_model(config, seed: int):
    """Random-init the model from `config` under a fixed torch seed (CPU, float32)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    return model.eval()


def build_tiny_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    corpus: Iterable[str] | None = None,
    **overrides: Any,
) -> Path:
    """Write a complete tiny random-weight checkpoint for `family` into `out_dir`; return the path.

    Same arguments -> byte-identical model.safetensors. `overrides`: `text_config`,
    `vision_config`, `image_processor` dicts update the family defaults; any other key is
    set on the top-level model config.
    """
    if family not in ADAPTERS:
        raise ConfigError(f"The 'family' parameter of build_tiny_checkpoint must be one of {list(ADAPTERS)}. "
                          f"Got {family!r} instead.")
    if hidden_size % 2:
        raise ConfigError(f"The 'hidden_size' parameter of build_tiny_checkpoint must be even (2 attention "
                          f"heads). Got {hidden_size} instead.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(corpus) if corpus is not None else list(_DEFAULT_CORPUS)
    text_over = overrides.pop("text_config", None)
    vision_over = overrides.pop("vision_config", None)
    image_over = overrides.pop("image_processor", None)

    cfg, processor = ADAPTERS[family].build_tiny(texts, hidden_size, num_layers, image_over)
    cfg["text_config"] = _merge(cfg["text_config"], text_over)
    cfg["vision_config"] = _merge(cfg["vision_config"], vision_over)
    cfg.update(overrides)

    config = _make_config(family, cfg)
    model = _build_model(config, seed)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
