"""Qwen3-VL: interleaved M-RoPE and deepstack (features of early vision blocks added to the first
text layers' outputs at the visual positions)."""

from __future__ import annotations

from gapcache.extract.families.qwen import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"
    description = "Qwen3-VL (deepstack)"

    def deepstack_layers(self, model) -> tuple[int, ...]:
        """Level k of ``vision_config.deepstack_visual_indexes`` is added to the output of decoder layer k."""
        return tuple(range(len(model.config.vision_config.deepstack_visual_indexes)))

    def tiny_specials(self):
        from gapcache.extract import tiny

        return list(tiny.QWEN_SPECIALS) + list(tiny.QWEN3_EXTRA_SPECIALS)

    def tiny_update(self, text, vision, head_dim, section):
        """One deepstack level: vision block 0 -> added after text layer 0."""
        text.update(head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": section, "mrope_interleaved": True})
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"],
                      num_position_embeddings=64, deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh")

    def tiny_processor_parts(self):
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        from gapcache.extract import tiny

        return dict(mean=[0.5] * 3, std=[0.5] * 3, processor_cls=Qwen3VLProcessor,
                    video_cls=Qwen3VLVideoProcessor, chat_template=tiny.QWEN3_TEMPLATE)
