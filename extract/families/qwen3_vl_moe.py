"""Qwen3-VL MoE (e.g. Qwen3-VL-30B-A3B, 48 layers, 128 experts top-8): Qwen3-VL with sparse MLPs."""

from __future__ import annotations

from gapcache.extract.families.qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_class = "Qwen3VLMoeForConditionalGeneration"
    description = "Qwen3-VL MoE, e.g. Qwen3-VL-30B-A3B (48 layers)"
    routing_rule = ("Qwen3VLMoeTextTopKRouter: p = softmax(W_gate h) in float32 over the experts; the top-k experts "
                    "by p, their weights p renormalized to sum 1 over the top k (then cast to the model dtype)")

    def routers(self, model) -> list:
        """``layer.mlp.gate`` of each sparse layer (``Qwen3VLMoeTextSparseMoeBlock``); None for the dense
        ``mlp_only_layers`` (or off the ``decoder_sparse_step``), whose MLP has no experts."""
        return [layer.mlp.gate if hasattr(layer.mlp, "experts") else None for layer in self.decoder_layers(model)]

    def routing_shape(self, config) -> tuple[int, int, int]:
        t = config.get_text_config()
        return int(t.num_hidden_layers), int(t.num_experts), int(t.num_experts_per_tok)

    def router_choice(self, output):
        """The router returns (logits (tokens, experts), top-k weights (tokens, k), top-k ids (tokens, k))."""
        _, weights, ids = output
        return ids, weights

    def tiny_update(self, text, vision, head_dim, section):
        """Qwen3-VL's tiny config plus 4 experts, top-2, on every layer."""
        super().tiny_update(text, vision, head_dim, section)
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text["hidden_size"],
                    decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
