"""Qwen3-VL MoE (e.g. Qwen3-VL-30B-A3B, 48 layers, 128 experts top-8): Qwen3-VL with sparse MLPs."""

from __future__ import annotations

from gapcache.extract.families.qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_class = "Qwen3VLMoeForConditionalGeneration"
    description = "Qwen3-VL MoE, e.g. Qwen3-VL-30B-A3B (48 layers)"

    def tiny_update(self, text, vision, head_dim, section):
        """Qwen3-VL's tiny config plus 4 experts, top-2, on every layer."""
        super().tiny_update(text, vision, head_dim, section)
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text["hidden_size"],
                    decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
