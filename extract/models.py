"""Model-family adapters: the one registry mapping a family to what differs between families.

Usage::

    adapter = get_adapter("qwen3_vl_moe")
    model, processor = adapter.load(cfg.model)         # AutoModelForImageTextToText / AutoProcessor
    layers = adapter.decoder_layers(model)             # model.model.language_model.layers

All five families load through ``AutoModelForImageTextToText`` and ``AutoProcessor`` from a hub
id or a local directory. Torch is imported lazily so the registry itself is torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from gapcache.errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class Adapter:
    family: str
    model_class: str  # class AutoModelForImageTextToText must produce
    answer_prefix: str  # text put before an answer when it is tokenized after the generation prompt
    description: str

    # --- structure (transformers 5.x: the same paths for all five families)
    def decoder_layers(self, model):
        return model.model.language_model.layers

    def final_norm(self, model):
        return model.model.language_model.norm

    def n_layers(self, model) -> int:
        return len(self.decoder_layers(model))

    def hidden_size(self, model) -> int:
        return int(model.config.get_text_config().hidden_size)

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)

    def messages(self, question: str) -> list:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def n_image_tokens(self, model, inputs, row: int) -> int:
        """How many image embeddings the model inserts for one row of a processed batch."""
        if self.family == "llava":
            vc = model.config.vision_config
            h, w = inputs["pixel_values"].shape[-2:]
            n = (h // vc.patch_size) * (w // vc.patch_size)
            return n if model.config.vision_feature_select_strategy == "default" else n + 1
        merge = model.config.vision_config.spatial_merge_size
        return int(inputs["image_grid_thw"][row].prod()) // merge**2

    # --- loading
    def load(self, mcfg):
        """Model (eval mode) and processor, through the Auto classes, offline-friendly."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = resolve_model_path(mcfg.id, self.family)
        common = dict(revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code)
        try:
            processor = AutoProcessor.from_pretrained(path, **common)
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=getattr(torch, mcfg.dtype), device_map=mcfg.device_map,
                attn_implementation=mcfg.attn_implementation, **common,
            )
        except OSError as err:
            raise ConfigError(
                f"Cannot load model {mcfg.id!r} (family {self.family}): {err}. "
                "Point model.id at a local checkpoint directory, or pre-download it on a login node with "
                f"`huggingface-cli download {mcfg.id}` and set HF_HUB_OFFLINE=1 on compute nodes."
            ) from None
        if type(model).__name__ != self.model_class:
            raise ConfigError(
                f"The 'model.family' {self.family!r} expects {self.model_class}; {mcfg.id!r} loaded as "
                f"{type(model).__name__}. Set model.family to the checkpoint's family."
            )
        model.eval()
        return model, processor


ADAPTERS = {
    "llava": Adapter("llava", "LlavaForConditionalGeneration", " ", "LLaVA-1.5 (CLIP + Llama)"),
    "qwen2_vl": Adapter("qwen2_vl", "Qwen2VLForConditionalGeneration", "", "Qwen2-VL"),
    "qwen2_5_vl": Adapter("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "", "Qwen2.5-VL"),
    "qwen3_vl": Adapter("qwen3_vl", "Qwen3VLForConditionalGeneration", "", "Qwen3-VL (deepstack)"),
    "qwen3_vl_moe": Adapter("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "",
                            "Qwen3-VL MoE, e.g. Qwen3-VL-30B-A3B (48 layers)"),
}


def get_adapter(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise UnknownNameError("model family", family, ADAPTERS)
    return ADAPTERS[family]


BUILTIN_PREFIX = "builtin:"


def cache_dir() -> Path:
    return Path(os.environ.get("GAPCACHE_CACHE", Path.home() / ".cache" / "gapcache"))


# Trained models shipped inside the package (core/builtin/<name>): name -> family.
# ``tiny-llava-shapes`` is trained by ``python -m gapcache.extract.train_tiny`` on the synthetic shapes.
SHIPPED = {"tiny-llava-shapes": "llava"}


def shipped_dir() -> Path:
    import gapcache

    return Path(gapcache.__file__).resolve().parent / "builtin"


def resolve_model_path(model_id: str, family: str) -> str:
    """A hub id or directory as is; ``builtin:tiny-llava-shapes`` the trained model shipped in the
    package; ``builtin:tiny-<family>`` (random weights) built once into the gapcache cache."""
    if not model_id.startswith(BUILTIN_PREFIX):
        return model_id
    name = model_id[len(BUILTIN_PREFIX):]
    if name in SHIPPED:
        if family != SHIPPED[name]:
            raise ConfigError(f"The builtin model {model_id!r} is a {SHIPPED[name]} model; set model.family to "
                              f"{SHIPPED[name]!r}. Got {family!r} instead.")
        path = shipped_dir() / name
        if not (path / "config.json").is_file():
            raise ConfigError(f"The shipped model files of {model_id!r} are missing from '{path}'. Reinstall "
                              "gapcache, or retrain them with `python -m gapcache.extract.train_tiny`.")
        return str(path)
    fam = name.removeprefix("tiny-").replace("-", "_")
    if not name.startswith("tiny-") or fam not in ADAPTERS:
        raise UnknownNameError("builtin model", model_id, [f"{BUILTIN_PREFIX}{n}" for n in SHIPPED]
                               + [f"{BUILTIN_PREFIX}tiny-{f}" for f in ADAPTERS])
    from gapcache.extract.tiny import build_tiny_checkpoint

    out = cache_dir() / "builtin" / name
    if not (out / "config.json").is_file():
        build_tiny_checkpoint(fam, out, seed=0, num_layers=4)
    return str(out)


def processor_fingerprint(processor) -> dict:
    """Hashes that pin what the processor does: chat template and processor/tokenizer configs."""
    template = getattr(processor, "chat_template", None) or ""
    tok = processor.tokenizer
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    image_cfg = processor.image_processor.to_json_string() if hasattr(processor, "image_processor") else ""
    sha = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]  # noqa: E731
    return {
        "processor_class": type(processor).__name__,
        "chat_template_sha256": sha(template),
        "tokenizer_vocab_sha256": sha(vocab),
        "image_processor_sha256": sha(image_cfg),
    }
