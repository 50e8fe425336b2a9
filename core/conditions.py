"""The one registry of input conditions (DESIGN.md, "Conditions").

Every condition keeps the prompt and the token layout of ``original`` so that positions line up
sample by sample. ``truncated`` expands into one store entry per (strategy, L):
``truncated_zero_L3`` means decoder layers 0..3 read the real visual states and every layer with
index > 3 reads intervened ones (the intervention acts on the *input* of layers L+1.., i.e. the
residual stream leaving layer L; L = -1: no layer sees the image's states).

This module is torch-free: the analysis tier reads the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

from gapcache.errors import ConfigError, UnknownNameError

CONDITIONS = {
    "original": "the sample's image",
    "blind_black": "an all-black image of the original's size",
    "blind_mean": "a uniform image of the mean RGB over the run's samples (recorded)",
    "blind_randomimage": "another sample's image (a recorded derangement), resized to the original's size",
    "truncated": "the original image; visual-token states intervened on at the input of every layer > L",
}

#: truncation strategies: what layers > L receive at the visual positions
STRATEGIES = {
    "zero": "visual-position states overwritten with zeros at the input of each layer > L (still attended)",
    "drop": "visual positions masked out of attention (as keys) in every layer > L",
}

NO_LAYER = -999  # truncation_layer of a condition that is not truncated


@dataclass(frozen=True)
class Condition:
    """One store entry along the ``condition`` dimension."""

    kind: str  # a key of CONDITIONS
    truncation_layer: int = NO_LAYER
    strategy: str = ""

    @property
    def label(self) -> str:
        if self.kind != "truncated":
            return self.kind
        layer = f"m{-self.truncation_layer}" if self.truncation_layer < 0 else str(self.truncation_layer)
        return f"truncated_{self.strategy}_L{layer}"

    @property
    def image_kind(self) -> str:
        """Which image is fed: 'original', 'black', 'mean' or 'randomimage'."""
        return {"blind_black": "black", "blind_mean": "mean", "blind_randomimage": "randomimage"}.get(
            self.kind, "original"
        )

    @property
    def records_visual(self) -> bool:
        """Visual-span states are cached for the non-truncated conditions only."""
        return self.kind != "truncated"


def expand(names, truncation_layers=(), strategies=("zero",), n_layers: int | None = None) -> list[Condition]:
    """Condition names from a config -> the ordered store entries.

    >>> [c.label for c in expand(["original", "truncated"], [-1, 2], ["zero", "drop"])]
    ['original', 'truncated_zero_Lm1', 'truncated_zero_L2', 'truncated_drop_Lm1', 'truncated_drop_L2']
    """
    out: list[Condition] = []
    for name in names:
        if name not in CONDITIONS:
            raise UnknownNameError("condition", name, CONDITIONS)
        if name != "truncated":
            out.append(Condition(name))
            continue
        if not truncation_layers:
            raise ConfigError(
                "The 'truncation_layers' parameter must be a non-empty list of layers when "
                "'truncated' is among the conditions. Got [] instead."
            )
        for strategy in strategies:
            if strategy not in STRATEGIES:
                raise UnknownNameError("truncation strategy", strategy, STRATEGIES)
            for layer in truncation_layers:
                if layer < -1 or (n_layers is not None and layer >= n_layers):
                    top = "n_layers - 1" if n_layers is None else n_layers - 1
                    raise ConfigError(
                        f"The 'truncation_layers' entries must lie in [-1, {top}]. Got {layer} instead."
                    )
                out.append(Condition("truncated", int(layer), strategy))
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"The 'conditions' parameter must not repeat a condition. Got {labels} instead.")
    return out
