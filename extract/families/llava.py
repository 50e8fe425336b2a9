"""LLaVA-1.5 (CLIP vision tower + Llama): ``<image>`` expanded to a fixed number of patch embeddings."""

from __future__ import annotations

from gapcache.extract.families.base import Adapter


class LlavaAdapter(Adapter):
    family = "llava"
    model_class = "LlavaForConditionalGeneration"
    answer_prefix = " "  # "ASSISTANT:" then " yes": Llama's tokenizer needs the space
    description = "LLaVA-1.5 (CLIP + Llama)"

    def n_image_tokens(self, model, inputs, row: int) -> int:
        """One embedding per CLIP patch (plus CLS unless the 'default' strategy drops it); the same for
        every row, since the image processor resizes every image to the tower's input size."""
        vc = model.config.vision_config
        h, w = inputs["pixel_values"].shape[-2:]
        n = (h // vc.patch_size) * (w // vc.patch_size)
        return n if model.config.vision_feature_select_strategy == "default" else n + 1

    def build_tiny(self, texts, hidden, layers, image_overrides):
        """CLIP 32 px / patch 8 -> 16 ``<image>`` tokens; Llama text model; LLaVA-1.5-hf template."""
        from gapcache.extract import tiny

        tok = tiny.llava_tokenizer(texts, 512)
        return tiny.llava_config(tok, hidden, layers), tiny.llava_processor(tok, image_overrides)
