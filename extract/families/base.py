"""The adapter base class: what every family shares, and the hooks each family must fill in.

A family adapter owns *all* of its family's knowledge, so that nothing outside
``gapcache.extract.families`` branches on a family name:

* structure: ``decoder_layers``, ``final_norm``, ``n_layers``, ``hidden_size``, ``image_token_id``;
* prompts: ``messages`` (the chat-template input), ``answer_prefix``;
* planning: ``n_image_tokens`` (image embeddings the model inserts) and ``question_char_span``
  (where the question, placed by the chat template, lies in the *processed* text, i.e. after the
  processor expanded the image placeholder), used by the site finders;
* ``deepstack_layers``: decoder layers after which visual features are added again (Qwen3-VL);
* ``routers``, ``routing_shape``, ``router_choice``, ``routing_rule``: MoE routing (Qwen3-VL-MoE);
* ``lens_norm``: the final norm in the form the CPU logit lens applies,
  ``(offset + w) * h / sqrt(mean(h**2) + eps)``;
* ``build_tiny``: the tiny random-weight checkpoint of the family (config dict and processor).

Torch and transformers are imported lazily, so importing an adapter is torch-free.
"""

from __future__ import annotations

from gapcache.errors import ConfigError


class Adapter:
    """One model family. Subclasses set the class attributes and implement the abstract methods."""

    family: str = ""
    model_class: str = ""  # class AutoModelForImageTextToText must produce
    answer_prefix: str = ""  # text put before an answer when it is tokenized after the generation prompt
    description: str = ""
    norm_offset: float = 0.0  # 0.0: Llama/Qwen RMSNorm ``w * h / rms``; 1.0: Gemma-style ``(1 + w) * h / rms``

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"

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

    # --- planning
    def n_image_tokens(self, model, inputs, row: int) -> int:
        """How many image embeddings the model inserts for one row of a processed batch."""
        raise NotImplementedError(f"{type(self).__name__} must define n_image_tokens")

    def question_char_span(self, prompt: str, start: int, length: int, visual_length: int,
                           image_token: str) -> tuple[int, int]:
        """(start, end) in the processed text (the coordinates of the tokenizer's offset mapping) of the
        question that occupies ``prompt[start : start + length]`` (``start`` from the chat template, see
        ``Planner.question_start``).

        Default: the processor expands the one image placeholder into ``visual_length`` copies of
        ``image_token``; when the placeholder lies before the question (in the template's text before
        it, never searched in the question or after it), the question moves right by
        ``(visual_length - 1) * len(image_token)`` characters.
        """
        shift = (visual_length - 1) * len(image_token) if image_token in prompt[:start] else 0
        return start + shift, start + length + shift

    def question_char_end(self, prompt: str, question: str, visual_length: int, image_token: str) -> int:
        """Character offset, in the processed text (the coordinates of the tokenizer's offset mapping),
        where the last occurrence of ``question`` in ``prompt`` ends.

        Default: the processor expands the one image placeholder, which precedes the question, into
        ``visual_length`` copies of ``image_token``, so the question moves right by
        ``(visual_length - 1) * len(image_token)`` characters. A convenience for prompts whose
        question is known to occur last; the site finder does not use it (it takes the question's
        place from the chat template, ``question_char_span``).
        """
        end = prompt.rfind(question) + len(question)
        return end + (visual_length - 1) * len(image_token)

    def deepstack_layers(self, model) -> tuple[int, ...]:
        """Decoder layers after whose output visual features are added at the visual positions
        (so the stream entering layer l + 1 includes them). Empty for families without deepstack."""
        return ()

    # --- MoE routing (extract.routing)
    routing_rule: str = ""  # how the router picks its experts, as recorded in the store; "" = no routing

    def routers(self, model) -> list:
        """The router module of every decoder layer (None for a dense layer); [] for a family without MoE."""
        return []

    def routing_shape(self, config) -> tuple[int, int, int] | None:
        """(router layers, experts, top-k) from the model config (no weights needed); None without MoE."""
        return None

    def router_choice(self, output):
        """(expert ids (tokens, k) long, weights (tokens, k)) from a router module's forward output: the
        experts and weights the model applies, tokens in the order of its (batch * seq) input."""
        raise NotImplementedError(f"{type(self).__name__} has no MoE routing")

    # --- logit lens
    def lens_norm(self, model) -> dict:
        """The final norm as the CPU logit lens applies it: ``(offset + w) * h / sqrt(mean(h**2) + eps)``.

        Returns ``weight`` (float32 numpy, (hidden,)), ``eps`` (float), ``offset`` (float, this
        adapter's ``norm_offset``), ``norm_class`` (str) and ``formula`` (str, as recorded in the store).
        """
        norm = self.final_norm(model)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))
        offset = float(self.norm_offset)
        w = "w" if offset == 0.0 else f"({offset:g} + w)"
        return {
            "weight": norm.weight.detach().float().cpu().numpy(),
            "eps": eps, "offset": offset, "norm_class": type(norm).__name__,
            "formula": f"logits = lens_unembed @ ({w} * h / sqrt(mean(h**2) + eps))",
        }

    # --- tiny checkpoints (tests, demo)
    def build_tiny(self, texts: list, hidden: int, layers: int, image_overrides: dict | None) -> tuple[dict, object]:
        """(model config dict for ``AutoConfig.for_model(family, ...)``, processor) of this family's tiny
        random-weight checkpoint; tokenizer trained on ``texts``. See ``gapcache.extract.tiny``."""
        raise NotImplementedError(f"{type(self).__name__} must define build_tiny")

    # --- loading
    def load(self, mcfg):
        """Model (eval mode) and processor, through the Auto classes, offline-friendly."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from gapcache.extract.models import resolve_model_path

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
