"""Qwen2.5-VL: Qwen2-VL's text model with a windowed-attention ViT."""

from __future__ import annotations

from gapcache.extract.families.qwen import QwenVLAdapter, qwen2_processor_parts


class Qwen2_5_VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    description = "Qwen2.5-VL"

    def tiny_update(self, text, vision, head_dim, section):
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
        # window 32 px = 2x2 merged tokens; block 1 does full attention (like 7, 15, 23, 31 in the 7B)
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"], window_size=32,
                      fullatt_block_indexes=[1], tokens_per_second=2)

    def tiny_processor_parts(self):
        from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

        return qwen2_processor_parts(Qwen2_5_VLProcessor)
