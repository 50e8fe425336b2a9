"""What the Qwen-VL families share: ``<|image_pad|>`` runs sized by ``image_grid_thw``, and the
tiny-checkpoint skeleton (Qwen2 tokenizer, shared config, Qwen2-VL image processor)."""

from __future__ import annotations

from gapcache.extract.families.base import Adapter


class QwenVLAdapter(Adapter):
    """Base of the Qwen-VL adapters. Subclasses define ``tiny_update`` and ``tiny_processor_parts``."""

    answer_prefix = ""  # "<|im_start|>assistant\n" then "yes"

    def n_image_tokens(self, model, inputs, row: int) -> int:
        """Dynamic resolution: (t * h * w patches of this row's image) / spatial_merge_size**2."""
        merge = model.config.vision_config.spatial_merge_size
        return int(inputs["image_grid_thw"][row].prod()) // merge**2

    # --- tiny checkpoints
    def tiny_specials(self) -> list:
        from gapcache.extract import tiny

        return list(tiny.QWEN_SPECIALS)

    def tiny_update(self, text: dict, vision: dict, head_dim: int, section: list) -> None:
        """Add the family's keys (rope, vision tower, MoE) to the shared tiny text/vision configs."""
        raise NotImplementedError(f"{type(self).__name__} must define tiny_update")

    def tiny_processor_parts(self) -> dict:
        """``mean``, ``std``, ``processor_cls``, ``video_cls``, ``chat_template`` of the tiny processor."""
        raise NotImplementedError(f"{type(self).__name__} must define tiny_processor_parts")

    def build_tiny(self, texts, hidden, layers, image_overrides):
        """Patch 8, merge 2 (one visual token per 16x16 px, 4..64 tokens); Qwen2 tokenizer."""
        from gapcache.extract import tiny

        tok = tiny.qwen_tokenizer(texts, self.tiny_specials(), 512)
        cfg = tiny.qwen_config(tok, hidden, layers, self.tiny_update)
        return cfg, tiny.qwen_processor(tok, image_overrides, **self.tiny_processor_parts())


def qwen2_processor_parts(processor_cls) -> dict:
    """Qwen2-VL / Qwen2.5-VL: CLIP normalization, Qwen2-VL video processor, the Qwen2 template."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from gapcache.extract import tiny

    return dict(mean=tiny.CLIP_MEAN, std=tiny.CLIP_STD, processor_cls=processor_cls,
                video_cls=Qwen2VLVideoProcessor, chat_template=tiny.QWEN2_TEMPLATE)
