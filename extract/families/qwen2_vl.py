"""Qwen2-VL: M-RoPE, a ViT whose width is the text hidden size."""

from __future__ import annotations

from gapcache.extract.families.qwen import QwenVLAdapter, qwen2_processor_parts


class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    description = "Qwen2-VL"

    def tiny_update(self, text, vision, head_dim, section):
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
        vision.update(embed_dim=32, hidden_size=text["hidden_size"], mlp_ratio=2)

    def tiny_processor_parts(self):
        from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

        return qwen2_processor_parts(Qwen2VLProcessor)
