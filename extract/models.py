"""Model loading helpers around the family registry (``gapcache.extract.families``).

Usage::

    adapter = get_adapter("qwen3_vl_moe")              # re-exported from gapcache.extract.families
    model, processor = adapter.load(cfg.model)         # AutoModelForImageTextToText / AutoProcessor
    path = resolve_model_path("builtin:tiny-qwen2-vl", "qwen2_vl")

All five families load through ``AutoModelForImageTextToText`` and ``AutoProcessor`` from a hub
id or a local directory. Torch is imported lazily so this module is torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gapcache.errors import ConfigError, UnknownNameError
from gapcache.extract.families import ADAPTERS, Adapter, get_adapter

__all__ = ["ADAPTERS", "Adapter", "get_adapter", "resolve_model_path", "processor_fingerprint", "cache_dir",
           "shipped_dir", "BUILTIN_PREFIX", "SHIPPED"]


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
