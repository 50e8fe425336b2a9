"""The one registry of input conditions and intervention strategies (DESIGN.md, "Conditions").

Every condition keeps the prompt and the token layout of ``original`` so that positions line up
sample by sample. ``truncated`` expands into one store entry per (strategy, L):
``truncated_zero_L3`` means decoder layers 0..3 read the real visual states and every layer with
index > 3 reads intervened ones (the intervention acts on the *input* of layers L+1.., i.e. the
residual stream leaving layer L; L = -1: no layer sees the image's states).

Two tables, one entry each:

* ``KINDS``: a :class:`ConditionKind` per condition name a config may list: the image it feeds,
  the analysis group it belongs to, whether its visual states are recorded, the config options it
  reads, how it expands into store entries (:class:`Condition`) and labels them, the parameters
  it records under ``condition_params``, the hook it installs (:class:`Hook`: strategy, layers,
  positions) and the invariant its recorded states satisfy (:class:`Invariant`).
* ``STRATEGIES``: a :class:`Strategy` per intervention strategy: what it does, whether it acts on
  the hidden states or on the attention mask, and which condition kinds accept it. Its torch
  implementation is registered under the same name in ``gapcache.extract.interventions``.

Adding a truncation strategy: one ``Strategy`` entry here plus its hook class in
``extract/interventions.py`` (``@implements(name)``); the conformance test
(``tests/test_interventions.py``) picks both up. This module is torch-free: the analysis tier
reads the same names and groups.
"""

from __future__ import annotations

import dataclasses

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from gapcache.errors import ConfigError, UnknownNameError

NO_LAYER = -999  # truncation_layer of a condition that is not truncated

#: the images a condition can feed; their pixels come from ``gapcache.extract.data.feed_image``
IMAGES = {
    "original": "the sample's image",
    "black": "an all-black image of the original's size",
    "mean": "a uniform image of the mean RGB over the run's samples",
    "randomimage": "another sample's image (the recorded derangement), resized to the original's size",
}
#: images that need the run's mean RGB / a donor sample's image
NEEDS_MEAN_RGB = frozenset({"mean"})
NEEDS_DONOR = frozenset({"randomimage"})

#: token positions a hook can act on (per planned sample; ``gapcache.extract.interventions.POSITIONS``)
POSITIONS = {"visual": "the sample's visual span (every image-token position)",
             "question": "the question's content tokens, first to last (site question; template and special tokens "
                         "excluded)"}
#: the channels of single-layer patching (DESIGN.md, "Single-layer patching, two channels") -> the positions hooked
CHANNELS = {"visual": "visual", "text": "question"}

#: analysis groups: the analysis asks for a group, never for a condition name
CLEAN, BLIND, TRUNCATION, WINDOW, PATCHING = "clean", "blind", "truncation", "window", "patching"
GROUPS = {
    CLEAN: "the unmodified input (the reference of every paired comparison)",
    BLIND: "the prompt with another image: what the answer owes to this image",
    TRUNCATION: "the original image, visual states intervened on at the input of every layer > L (Delta, EVD)",
    WINDOW: "the original image, visual positions intervened on at the input of decoder layers a..b only",
    PATCHING: "the original image, one channel (visual or the question's text tokens) corrupted at the input of one "
              "decoder layer l only (Delta_c(l), the transfer window)",
}

#: statistics a strategy substitutes from, fitted on ``original`` over the run's samples (a pre-pass over the
#: full visual span at the input of each layer the strategy acts on; stored as ``fit_*`` arrays)
FITS = {
    "mean": "per layer: the mean visual state over every visual token of every sample (fit_mean)",
    "pca": "per layer: the top principal directions and variances of the visual states (fit_pca_basis, "
           "fit_pca_variance)",
    "sigma": "per layer: the std of every entry of the visual states (tokens x hidden, population; fit_sigma)",
    "question_mean": "per layer: the mean state over every question content token of every sample "
                     "(fit_question_mean)",
    "question_sigma": "per layer: the std of every entry of the question tokens' states (fit_question_sigma)",
}


def fit_key(stat: str, positions: str) -> str:
    """The FITS key of statistic ``stat`` fitted over ``positions`` (the visual span: the plain name)."""
    return stat if positions == "visual" else f"{positions}_{stat}"


#: what a strategy changes: the hidden states at its positions, or which keys its positions are
ACTS_ON = ("states", "attention")


@dataclass(frozen=True)
class Strategy:
    """One intervention strategy (``truncation_strategies`` entry)."""

    name: str
    description: str
    acts_on: str  # one of ACTS_ON
    kinds: tuple[str, ...] = ("truncated",)  # the condition kinds that accept it
    fits: tuple[str, ...] = ()  # keys of FITS: statistics fitted on original that it substitutes from
    soft: bool = False  # a soft-truncation substitute (DESIGN.md, "Soft truncation") rather than zero / drop
    channels: tuple[str, ...] = tuple(CHANNELS)  # the patching channels it may act on (kind patched)
    donor: bool = False  # substitutes the states a donor sample's image produces (needs a donor forward)


@dataclass(frozen=True)
class Hook:
    """Where a condition intervenes: ``strategy`` on the input of decoder ``layers`` at ``positions``."""

    strategy: str
    layers: tuple[int, ...]  # decoder layer indices whose input is intervened on
    positions: str = "visual"  # a key of POSITIONS
    params: tuple[tuple[str, object], ...] = ()  # extra keyword arguments of the hook, as (name, value)


@dataclass(frozen=True)
class Invariant:
    """What a condition's recorded text-site states owe to ``original``'s, sample by sample.

    Hidden-state indices 0..``equal_through`` are bit-for-bit ``original``'s; with ``later_differ``
    every later index differs (at least one text site of every sample)."""

    equal_through: int
    later_differ: bool
    description: str


@dataclass(frozen=True)
class RunFacts:
    """What a run knows when it writes its store attributes (``ConditionKind.params`` reads it)."""

    extract: object  # the run's ExtractConfig (or anything with the same option attributes)
    mean_rgb: tuple | None = None
    donor: tuple | None = None
    fitted: object = None  # the statistics fitted on original (extract.interventions.Fitted: layers, values), if any


@dataclass(frozen=True)
class Condition:
    """One store entry along the ``condition`` dimension."""

    kind: str  # a key of KINDS
    truncation_layer: int = NO_LAYER
    strategy: str = ""
    # a window kind's decoder layers a..b (inclusive); recorded only when set, so older records stay identical
    window_start: int = field(default=NO_LAYER, metadata={"omit_default": True})
    window_end: int = field(default=NO_LAYER, metadata={"omit_default": True})
    # a patched kind's channel (a key of CHANNELS) and the one decoder layer whose input it corrupts
    channel: str = field(default="", metadata={"omit_default": True})
    patch_layer: int = field(default=NO_LAYER, metadata={"omit_default": True})

    @property
    def entry(self) -> ConditionKind:
        return kind(self.kind)

    @property
    def label(self) -> str:
        return self.entry.label(self)

    @property
    def image_kind(self) -> str:
        """Which image is fed: a key of IMAGES."""
        return self.entry.image

    @property
    def records_visual(self) -> bool:
        """Whether the store caches this condition's visual-span states."""
        return self.entry.records_visual

    @property
    def group(self) -> str:
        return self.entry.group

    def hook(self, n_layers: int) -> Hook | None:
        """The intervention this entry installs on a model of ``n_layers`` decoder layers (None: none)."""
        return self.entry.hook(self, n_layers)

    def invariant(self, n_layers: int) -> Invariant:
        return self.entry.invariant(self, n_layers)

    def to_dict(self) -> dict:
        """The store's record of this condition (root attribute ``conditions``): its label and every field
        (a field marked ``omit_default`` only when it is not at its default)."""
        out = {"label": self.label}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (f.metadata.get("omit_default") and value == f.default):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Condition":
        """Inverse of :meth:`to_dict` (fields a store does not record keep their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- rules of the kinds


def _plain_label(c: Condition) -> str:
    return c.kind


def _layer_tag(layer: int) -> str:
    return f"m{-layer}" if layer < 0 else str(layer)


def _truncated_label(c: Condition) -> str:
    return f"{c.kind}_{c.strategy}_L{_layer_tag(c.truncation_layer)}"


def _parse_truncated(entry: ConditionKind, label: str) -> Condition | None:
    """``<kind>_<strategy>_L<layer>`` (layer ``m1`` = -1) -> its Condition; None for another label."""
    m = re.match(rf"^{re.escape(entry.name)}_(?P<strategy>[a-z0-9_]+?)_L(?P<layer>m?\d+)$", label)
    if not m:
        return None
    layer = -int(m["layer"][1:]) if m["layer"].startswith("m") else int(m["layer"])
    return Condition(entry.name, layer, m["strategy"])


def _window_label(c: Condition) -> str:
    return f"{c.kind}_{c.strategy}_L{c.window_start}to{c.window_end}"


def _parse_window(entry: ConditionKind, label: str) -> Condition | None:
    """``<kind>_<strategy>_L<a>to<b>`` -> its Condition; None for another label."""
    m = re.match(rf"^{re.escape(entry.name)}_(?P<strategy>[a-z0-9_]+?)_L(?P<a>\d+)to(?P<b>\d+)$", label)
    if not m:
        return None
    return Condition(entry.name, strategy=m["strategy"], window_start=int(m["a"]), window_end=int(m["b"]))


def _parse_plain(entry: ConditionKind, label: str) -> Condition | None:
    return Condition(entry.name) if label == entry.name else None


def _expand_single(entry: ConditionKind, options: Mapping, n_layers: int | None) -> list[Condition]:
    return [Condition(entry.name)]


def _expand_truncated(entry: ConditionKind, options: Mapping, n_layers: int | None) -> list[Condition]:
    layers, strategies = list(options.get("truncation_layers", ())), list(options.get("truncation_strategies", ()))
    if not layers:
        raise ConfigError(
            "The 'truncation_layers' parameter must be a non-empty list of layers when "
            f"'{entry.name}' is among the conditions. Got [] instead."
        )
    out = []
    for name in strategies:
        check_strategy(name, entry.name)
        for layer in layers:
            if layer < -1 or (n_layers is not None and layer >= n_layers):
                top = "n_layers - 1" if n_layers is None else n_layers - 1
                raise ConfigError(f"The 'truncation_layers' entries must lie in [-1, {top}]. Got {layer} instead.")
            out.append(Condition(entry.name, int(layer), name))
    return out


def _expand_window(entry: ConditionKind, options: Mapping, n_layers: int | None) -> list[Condition]:
    windows, strategies = list(options.get("truncation_windows", ())), list(options.get("window_strategies", ()))
    if not windows:
        raise ConfigError("The 'truncation_windows' parameter must be a non-empty list of [a, b] layer windows when "
                          f"'{entry.name}' is among the conditions. Got [] instead.")
    out = []
    for name in strategies:
        check_strategy(name, entry.name)
        for a, b in windows:
            if n_layers is not None and b >= n_layers:
                raise ConfigError(f"The 'truncation_windows' entries must lie in [0, {n_layers - 1}]. "
                                  f"Got {[a, b]} instead.")
            out.append(Condition(entry.name, strategy=name, window_start=int(a), window_end=int(b)))
    return out


def _validate_window(entry: ConditionKind, options: Mapping, used: bool) -> None:
    accepted = strategies_of(entry.name)
    for s in options["window_strategies"]:
        _check(s in accepted, "extract.window_strategies", f"a list of {list(accepted)}", s)
    windows = options["truncation_windows"]
    _check(isinstance(windows, list), "extract.truncation_windows", "a list of [a, b] layer windows", windows)
    for w in windows:
        _check(isinstance(w, (list, tuple)) and len(w) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                      for x in w) and 0 <= w[0] <= w[1],
               "extract.truncation_windows", "a list of [a, b] windows of decoder layers with 0 <= a <= b", w)
    if used:
        _check(bool(windows), "extract.truncation_windows", f"non-empty when '{entry.name}' is run", windows)


def _validate_none(entry: ConditionKind, options: Mapping, used: bool) -> None:
    return None


def _accepted_text(kind_name: str) -> str:
    """What a kind's strategy list may hold, for an error message: the soft-truncation strategies listed apart."""
    soft = [n for n in strategies_of(kind_name) if STRATEGIES[n].soft]
    hard = [n for n in strategies_of(kind_name) if not STRATEGIES[n].soft]
    return (f"a list of soft-truncation strategies {soft} or of {hard}" if soft else f"a list of {hard}")


def _validate_truncated(entry: ConditionKind, options: Mapping, used: bool) -> None:
    accepted = strategies_of(entry.name)
    for s in options["truncation_strategies"]:
        _check(s in accepted, "extract.truncation_strategies", _accepted_text(entry.name), s)
    for layer in options["truncation_layers"]:
        _check(isinstance(layer, int) and not isinstance(layer, bool) and layer >= -1,
               "extract.truncation_layers", "a list of ints >= -1", layer)
    if used:
        _check(bool(options["truncation_layers"]), "extract.truncation_layers",
               f"non-empty when '{entry.name}' is run", options["truncation_layers"])


def _patched_label(c: Condition) -> str:
    return f"{c.kind}_{c.channel}_{c.strategy}_L{c.patch_layer}"


def _parse_patched(entry: ConditionKind, label: str) -> Condition | None:
    """``<kind>_<channel>_<strategy>_L<l>`` -> its Condition; None for another label."""
    channels = "|".join(map(re.escape, CHANNELS))
    m = re.match(rf"^{re.escape(entry.name)}_(?P<channel>{channels})_(?P<strategy>[a-z0-9_]+?)_L(?P<layer>\d+)$",
                 label)
    if not m:
        return None
    return Condition(entry.name, strategy=m["strategy"], channel=m["channel"], patch_layer=int(m["layer"]))


def _expand_patched(entry: ConditionKind, options: Mapping, n_layers: int | None) -> list[Condition]:
    """Every (channel, strategy, layer) of the options; a strategy limited to some channels (swap: visual)
    expands on those only."""
    layers = list(options.get("patch_layers", ()))
    channels = list(options.get("patch_channels", ()))
    strategies = list(options.get("patch_strategies", ()))
    if not layers:
        raise ConfigError("The 'patch_layers' parameter must be a non-empty list of decoder layers when "
                          f"'{entry.name}' is among the conditions. Got [] instead.")
    _check_swap_channels(strategies, channels)
    out = []
    for channel in channels:
        _check(channel in CHANNELS, "extract.patch_channels", f"a list of {list(CHANNELS)}", channel)
        for name in strategies:
            if channel not in check_strategy(name, entry.name).channels:
                continue
            for layer in layers:
                if layer < 0 or (n_layers is not None and layer >= n_layers):
                    top = "n_layers - 1" if n_layers is None else n_layers - 1
                    raise ConfigError(f"The 'patch_layers' entries must lie in [0, {top}]. Got {layer} instead.")
                out.append(Condition(entry.name, strategy=name, channel=channel, patch_layer=int(layer)))
    return out


def _check_swap_channels(strategies, channels) -> None:
    """A strategy limited to some channels (swap: the visual one) needs one of them among ``channels``."""
    for name in strategies:
        allowed = STRATEGIES[name].channels if name in STRATEGIES else tuple(CHANNELS)
        if not set(allowed) & set(channels):
            raise ConfigError(
                f"The 'extract.patch_strategies' entry {name!r} acts on the {' / '.join(allowed)} channel only, but "
                f"'extract.patch_channels' is {list(channels)}. Add {allowed[0]!r} to patch_channels or remove "
                f"{name!r} from patch_strategies.")


def _validate_patched(entry: ConditionKind, options: Mapping, used: bool) -> None:
    accepted = strategies_of(entry.name)
    strategies, channels, layers = options["patch_strategies"], options["patch_channels"], options["patch_layers"]
    for name, value in (("patch_strategies", strategies), ("patch_channels", channels), ("patch_layers", layers)):
        _check(isinstance(value, list), f"extract.{name}", "a list", value)
    for s in strategies:
        _check(s in accepted, "extract.patch_strategies", f"a list of {list(accepted)}", s)
    for c in channels:
        _check(c in CHANNELS, "extract.patch_channels", f"a list of {list(CHANNELS)}", c)
    for name, value in (("patch_strategies", strategies), ("patch_channels", channels), ("patch_layers", layers)):
        _check(len(set(map(str, value))) == len(value), f"extract.{name}", "a list without repeats", value)
    for layer in layers:
        _check(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0,
               "extract.patch_layers", "a list of decoder layer indices (ints >= 0)", layer)
    if used:
        _check(bool(layers), "extract.patch_layers", f"non-empty when '{entry.name}' is run", layers)
        _check(bool(channels), "extract.patch_channels", f"non-empty when '{entry.name}' is run", channels)
        _check(bool(strategies), "extract.patch_strategies", f"non-empty when '{entry.name}' is run", strategies)
        _check_swap_channels(strategies, channels)


def _patched_hook(c: Condition, n_layers: int) -> Hook | None:
    if c.channel not in CHANNELS:
        raise UnknownNameError("patching channel", c.channel, CHANNELS)
    if c.channel not in strategy(c.strategy).channels:
        raise ConfigError(f"The patching strategy {c.strategy!r} acts on the {list(strategy(c.strategy).channels)} "
                          f"channel(s) only. Got channel {c.channel!r} ({c.label}) instead.")
    return Hook(c.strategy, (c.patch_layer,), CHANNELS[c.channel]) if 0 <= c.patch_layer < n_layers else None


def _no_hook(c: Condition, n_layers: int) -> Hook | None:
    return None


def _truncated_hook(c: Condition, n_layers: int) -> Hook | None:
    layers = tuple(range(c.truncation_layer + 1, n_layers))
    return Hook(c.strategy, layers, "visual") if layers else None


def _window_hook(c: Condition, n_layers: int) -> Hook | None:
    layers = tuple(range(c.window_start, min(c.window_end, n_layers - 1) + 1))
    return Hook(c.strategy, layers, "visual") if layers else None


def _clean_invariant(c: Condition, n_layers: int) -> Invariant:
    return Invariant(n_layers, False, "the reference itself")


def _blind_invariant(c: Condition, n_layers: int) -> Invariant:
    return Invariant(0, False, "same token layout as original: the text sites' embedding output (index 0) is original's")


def _truncated_invariant(c: Condition, n_layers: int) -> Invariant:
    """Layers 0..L read real visual states, so every stream up to the input of layer L+1 is original's at the
    text sites (L+1 itself intervenes on visual positions or inside its attention only); later ones differ."""
    same = min(c.truncation_layer + 1, n_layers)
    return Invariant(same, same < n_layers,
                     "text-site states at indices <= L+1 equal original's, every later index differs")


def _window_invariant(c: Condition, n_layers: int) -> Invariant:
    """Layers 0..a-1 read the real visual states, so every stream up to the input of layer a is original's at
    the text sites (layer a itself intervenes on visual positions or inside its attention); later ones differ."""
    same = min(c.window_start, n_layers)
    return Invariant(same, same < n_layers,
                     "text-site states at indices <= a equal original's, every later index differs")


def _patched_invariant(c: Condition, n_layers: int) -> Invariant:
    """Only the input of layer l is corrupted: every stream before it is original's at the text sites, and so is
    index l itself for the visual channel (the text channel corrupts the question tokens, the instruction site
    among them, at index l); every later index differs."""
    same = min(c.patch_layer if c.channel == "visual" else c.patch_layer - 1, n_layers)
    return Invariant(same, same < n_layers, "text-site states at indices < l (visual channel: <= l) equal "
                                            "original's, every later index differs")


def _no_params(facts: RunFacts):
    return None


def _mean_params(facts: RunFacts):
    return {"mean_rgb": list(facts.mean_rgb) if facts.mean_rgb else None}


def _randomimage_params(facts: RunFacts):
    return {"seed": facts.extract.seed, "donor": list(facts.donor), "resize": "PIL bicubic to the original's size"}


#: how each soft strategy draws its substitute (recorded in condition_params when a run uses it)
SOFT_RULES = {
    "norm_noise": "h' = z * ||h|| / ||z|| per visual token, z ~ N(0, I) (float32, cast to the model dtype)",
    "pca_noise": "h' = fit_mean[l] + sum_j sqrt(fit_pca_variance[l, j]) * z_j * fit_pca_basis[l, j], z ~ N(0, I_k)",
    "mean": "h' = fit_mean[l] at every visual position (cast to the model dtype)",
    "shuffle": "h'[t] = h[perm[t]] over the sample's visual positions; perm: one random n-cycle per sample "
               "(Sattolo's algorithm, no token keeps its place), the same at every layer",
}
SEED_RULE = ("noise / permutation of sample i at layer l from numpy SeedSequence([soft_seed, crc32(strategy name), i, "
             "l + 1]) (l = -1 for shuffle's one permutation); noise drawn by torch.randn on the model's device with "
             "that seed (so values depend on the device type, never on the batch or the array task)")


def fitted_layers(conds, n_layers: int) -> dict[str, tuple[int, ...]]:
    """Per statistic of FITS (``fit_key``: over the positions of the hook): the decoder layers whose input some
    condition of ``conds`` substitutes from it."""
    out: dict[str, set] = {}
    for c in conds:
        hook = c.hook(n_layers)
        if hook is not None:
            for f in STRATEGIES[hook.strategy].fits:
                out.setdefault(fit_key(f, hook.positions), set()).update(hook.layers)
    return {f: tuple(sorted(v)) for f, v in out.items()}


def soft_params(e, strategies) -> dict | None:
    """The recorded parameters of the soft strategies among ``strategies`` (None: no soft strategy)."""
    soft = [s for s in strategies if s in STRATEGIES and STRATEGIES[s].soft]
    if not soft:
        return None
    out = {"seed": e.soft_seed, "seed_rule": SEED_RULE, "rules": {s: SOFT_RULES.get(s, STRATEGIES[s].description)
                                                                  for s in soft}}
    fits = [f for s in soft for f in STRATEGIES[s].fits]
    if fits:
        out["fitted"] = {"statistics": sorted(set(fits)), "pca_k": e.soft_pca_k if "pca" in fits else None,
                         "source": "a pre-pass forward of original over every extractable sample, full visual "
                                   "span (extract.visual ignored), at the input of every layer these strategies "
                                   "act on; float64 sums, stored as float32 arrays fit_layer, fit_mean, "
                                   "fit_pca_basis, fit_pca_variance (population covariance, eigenvectors signed "
                                   "so their largest-magnitude entry is positive)",
                         "shared": "computed once, by the task that creates the store (others wait for it), "
                                   "and read back from the store by every task"}
    return out


def _truncated_params(facts: RunFacts):
    e = facts.extract
    out = {"layers": list(e.truncation_layers), "strategies": list(e.truncation_strategies),
           "convention": "input of every decoder layer with index > L is intervened on"}
    soft = soft_params(e, e.truncation_strategies)
    if soft:
        out["soft"] = soft
    return out


def _window_params(facts: RunFacts):
    e = facts.extract
    if "window" not in e.conditions:  # stores of runs without windows keep their condition_params byte for byte
        return None
    return {"windows": [list(w) for w in e.truncation_windows], "strategies": list(e.window_strategies),
            "convention": "input of decoder layers a..b (inclusive) is intervened on"}


#: what each strategy puts at the positions of a patched channel (recorded in condition_params.patched.rules)
PATCH_RULES = {
    "zero": "h'[t] = 0 at every position t of the channel",
    "gaussian": "h'[t] = h[t] + sigma_c(l) * z_t, z_t ~ N(0, I) (float32, cast to the model dtype), additive as in "
                "causal tracing; sigma_c(l) (condition_params.patched.sigma; fit_sigma, fit_question_sigma): the std "
                "of every entry of original's states of channel c at the input of l over the run's samples",
    "norm_noise": "h'[t] = z_t * ||h[t]|| / ||z_t||, z_t ~ N(0, I) (float32, cast to the model dtype)",
    "mean": "h'[t] = the mean state of channel c at the input of l over the run (fit_mean: visual, "
            "fit_question_mean: text) at every position t",
    "swap": "h'[t] = the state at visual position t entering layer l in a forward of this sample's prompt with its "
            "donor's image resized to this image's size (blind_randomimage's input; same token layout)",
}
PATCH_FIT_SOURCE = ("a pre-pass forward of original over every extractable sample (the full visual span; the "
                    "question's content tokens), at the input of every layer a fitting strategy acts on, float64 "
                    "sums: mean = sum x / n over tokens; sigma = sqrt(sum x^2 / N - (sum x / N)^2) over the "
                    "N = tokens x hidden entries; stored as float32 arrays fit_layer, fit_mean, fit_sigma, "
                    "fit_question_mean, fit_question_sigma")
#: strategies whose substitute draws noise (seeded by extract.soft_seed and SEED_RULE)
NOISY = frozenset({"gaussian", "norm_noise", "pca_noise"})


def _sigma_table(facts: RunFacts, channels, layers):
    """channel -> {str(l): sigma_c(l)} from the run's fitted statistics (None where they are not known yet)."""
    f = facts.fitted
    if f is None:
        return None
    out = {}
    for ch in channels:
        values = f.values[fit_key("sigma", CHANNELS[ch])]
        out[ch] = {str(l): float(values[f.layers[l]]) for l in layers}
    return out


def _patched_params(facts: RunFacts):
    e = facts.extract
    if "patched" not in e.conditions:  # stores of runs without patching keep their condition_params byte for byte
        return None
    strategies, channels = list(e.patch_strategies), list(e.patch_channels)
    out = {"layers": list(e.patch_layers), "channels": channels, "strategies": strategies,
           "convention": "input of decoder layer l only is corrupted, at the channel's positions",
           "positions": {ch: POSITIONS[CHANNELS[ch]] for ch in channels},
           "rules": {s: PATCH_RULES[s] for s in strategies}}
    if NOISY & set(strategies):
        out.update(seed=e.soft_seed, seed_rule=SEED_RULE)
    if "gaussian" in strategies:
        out["sigma"] = _sigma_table(facts, channels, e.patch_layers)
    fits = sorted({fit_key(f, CHANNELS[ch]) for s in strategies for f in STRATEGIES[s].fits for ch in channels
                   if ch in STRATEGIES[s].channels})
    if fits:
        out["fitted"] = {"statistics": fits, "source": PATCH_FIT_SOURCE,
                         "shared": "computed once, by the task that creates the store (others wait for it), and "
                                   "read back from the store by every task"}
    if "swap" in strategies and "visual" in channels:
        out["swap"] = {"donor": list(facts.donor) if facts.donor is not None else None, "seed": e.seed,
                       "derangement": "the one blind_randomimage feeds (the store's donor array; -1: no donor)",
                       "resize": "PIL bicubic to the original's size",
                       "states": "one extra forward per sample and swap condition of the donor-image prompt, "
                                 "stopped at the input of layer l (vision tower + layers 0..l-1)"}
    return out


def _merge_first(name: str, found: list, remap) -> dict | None:
    """Parameters of merged stores: the first input's (inputs that ran the kind with other settings add entries
    of their own labels, so nothing of theirs is lost)."""
    return found[0][1] if found else None


def _merge_equal(name: str, found: list, remap) -> dict | None:
    """The kind fed the same input in every store (e.g. one mean colour), or the stores cannot be merged."""
    import json

    from gapcache.errors import IncompatibleStoreError

    if len({json.dumps(p, sort_keys=True) for _, p in found}) > 1:
        key = next(iter(found[0][1] or {"value": None}))
        raise IncompatibleStoreError(
            f"Cannot merge: they differ in 'condition_params.{name}.{key}' ({dict(found)}); {name} fed a different "
            f"input in each. Merge them without that condition's runs, or re-extract {name} over the union of samples.")
    return _merge_first(name, found, remap)


def _merge_donors(name: str, found: list, remap) -> dict | None:
    """The recorded derangement, remapped to the merged sample order (``remap``: the merged donor array)."""
    out = dict(_merge_first(name, found, remap) or {})
    if out and remap is not None:
        out["donor"] = [int(x) for x in remap]
    return out or None


def _merge_truncated(name: str, found: list, remap, keys=("layers", "strategies", "windows")) -> dict | None:
    """The union of the truncation layers and strategies (window kinds: windows) the inputs ran."""
    out = dict(_merge_first(name, found, remap) or {})
    for key in keys:
        seen = []
        for _, p in found:
            seen += [v for v in (p or {}).get(key, []) if v not in seen]
        if seen:
            out[key] = sorted(seen) if key == "layers" else seen
    return out or None


def _merge_patched(name: str, found: list, remap) -> dict | None:
    """The union of the layers, channels and strategies; swap's donors remapped to the merged sample order; the
    sigma of each input kept when they differ (each input's gaussian entries were drawn with its own)."""
    import copy

    out = copy.deepcopy(_merge_truncated(name, found, remap, keys=("layers", "channels", "strategies")))
    if not out:
        return None
    if out.get("swap") and remap is not None:
        out["swap"]["donor"] = [int(x) for x in remap]
    sigmas = [p.get("sigma") for _, p in found if p and "sigma" in p]
    if any(s != sigmas[0] for s in sigmas):
        out["sigma_of_inputs"] = [{"store": str(path), "sigma": (p or {}).get("sigma")} for path, p in found]
    return out


@dataclass(frozen=True)
class ConditionKind:
    """One condition name of a config, and everything that derives from it.

    ``options``: the ExtractConfig fields it reads; ``default``: run when the config names no
    conditions; the callables are ``(entry, options, n_layers) -> [Condition]`` (expand),
    ``(entry, options, used) -> None`` raising ConfigError (validate), ``Condition -> str``
    (label), ``(entry, label) -> Condition | None`` (parse, the label rule's inverse),
    ``RunFacts -> dict | None`` (params, recorded under ``condition_params[name]``; None: no key),
    ``(Condition, n_layers) -> Hook | None`` and ``(Condition, n_layers) -> Invariant``;
    ``merge_params(name, [(store path, params)], donor) -> dict | None`` combines the recorded parameters
    of stores being merged (``donor``: the merged per-sample donor indices, or None).
    """

    name: str
    description: str
    image: str  # a key of IMAGES
    group: str  # a key of GROUPS
    records_visual: bool = True
    default: bool = True
    options: tuple[str, ...] = ()
    expand: Callable = field(default=_expand_single, repr=False)
    validate: Callable = field(default=_validate_none, repr=False)
    label: Callable = field(default=_plain_label, repr=False)
    parse: Callable = field(default=_parse_plain, repr=False)
    params: Callable = field(default=_no_params, repr=False)
    hook: Callable = field(default=_no_hook, repr=False)
    invariant: Callable = field(default=_clean_invariant, repr=False)
    merge_params: Callable = field(default=_merge_first, repr=False)


KINDS: dict[str, ConditionKind] = {}
STRATEGIES: dict[str, Strategy] = {}


def register_kind(entry: ConditionKind) -> ConditionKind:
    """Add a condition kind (its image, group and positions must be known names)."""
    for table, value, what in ((IMAGES, entry.image, "image"), (GROUPS, entry.group, "condition group")):
        if value not in table:
            raise UnknownNameError(what, value, table)
    KINDS[entry.name] = entry
    return entry


def register_strategy(entry: Strategy) -> Strategy:
    """Add an intervention strategy; its hook is registered under the same name in extract/interventions.py."""
    if entry.acts_on not in ACTS_ON:
        raise ConfigError(f"The 'acts_on' parameter of register_strategy must be one of {list(ACTS_ON)}. "
                          f"Got {entry.acts_on!r} instead.")
    STRATEGIES[entry.name] = entry
    return entry


register_kind(ConditionKind("original", "the sample's image", "original", CLEAN))
register_kind(ConditionKind("blind_black", "an all-black image of the original's size", "black", BLIND,
                            invariant=_blind_invariant))
register_kind(ConditionKind("blind_mean", "a uniform image of the mean RGB over the run's samples (recorded)",
                            "mean", BLIND, params=_mean_params, invariant=_blind_invariant, merge_params=_merge_equal))
register_kind(ConditionKind("blind_randomimage",
                            "another sample's image (a recorded derangement), resized to the original's size",
                            "randomimage", BLIND, params=_randomimage_params, invariant=_blind_invariant,
                            merge_params=_merge_donors))
register_kind(ConditionKind(
    "truncated", "the original image; visual-token states intervened on at the input of every layer > L",
    "original", TRUNCATION, records_visual=False, default=False,  # needs truncation_layers: opt-in
    options=("truncation_layers", "truncation_strategies"), expand=_expand_truncated, validate=_validate_truncated,
    label=_truncated_label, parse=_parse_truncated, params=_truncated_params, hook=_truncated_hook,
    merge_params=_merge_truncated,
    invariant=_truncated_invariant,
))

register_kind(ConditionKind(
    "window", "the original image; visual positions intervened on (zero or drop) at the input of layers a..b only",
    "original", WINDOW, records_visual=False, default=False,  # needs truncation_windows: opt-in
    options=("truncation_windows", "window_strategies"), expand=_expand_window, validate=_validate_window,
    label=_window_label, parse=_parse_window, params=_window_params, hook=_window_hook,
    merge_params=_merge_truncated, invariant=_window_invariant,
))

register_kind(ConditionKind(
    "patched", "the original image; one channel (visual or the question's text tokens) corrupted at the input of "
               "one decoder layer l only", "original", PATCHING, records_visual=False, default=False,
    options=("patch_layers", "patch_channels", "patch_strategies"), expand=_expand_patched, validate=_validate_patched,
    label=_patched_label, parse=_parse_patched, params=_patched_params, hook=_patched_hook,
    merge_params=_merge_patched, invariant=_patched_invariant,
))

register_strategy(Strategy(
    "zero", "visual-position states overwritten with zeros at the input of each layer > L (still attended)", "states",
    kinds=("truncated", "window", "patched")))
register_strategy(Strategy(
    "drop", "visual positions masked out of attention (as keys) in every layer > L", "attention",
    kinds=("truncated", "window")))
register_strategy(Strategy(
    "norm_noise", "each visual state replaced by Gaussian noise rescaled to that state's L2 norm", "states",
    kinds=("truncated", "patched"), soft=True))
register_strategy(Strategy(
    "pca_noise", "visual states replaced by noise with the clean visual states' mean and covariance in their top "
                 "principal directions at that layer (fitted on original)", "states", fits=("mean", "pca"),
    soft=True))
register_strategy(Strategy(
    "mean", "visual states replaced by the mean visual state of original over the run at that layer", "states",
    kinds=("truncated", "patched"), fits=("mean",), soft=True))
register_strategy(Strategy(
    "shuffle", "the sample's own visual states permuted over its visual positions (a random n-cycle)", "states",
    soft=True))

register_strategy(Strategy(
    "gaussian", "Gaussian noise of the clean states' std (sigma of that channel at that layer, fitted on original) "
                "added to each state (causal tracing)", "states", kinds=("patched",), fits=("sigma",)))
register_strategy(Strategy(
    "swap", "the visual states a donor sample's image (the recorded derangement, resized to this image's size) "
            "produces at that layer under this sample's prompt", "states", kinds=("patched",), channels=("visual",),
    donor=True))

# ----------------------------------------------------------------------------- lookups


def _check(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ConfigError(f"The '{name}' parameter must be {expected}. Got {got!r} instead.")


def kind(name: str) -> ConditionKind:
    """The registry entry of a condition kind; UnknownNameError if there is none."""
    if name not in KINDS:
        raise UnknownNameError("condition", name, KINDS)
    return KINDS[name]


def strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise UnknownNameError("truncation strategy", name, STRATEGIES)
    return STRATEGIES[name]


def strategies_of(kind_name: str) -> tuple[str, ...]:
    """The strategies a condition kind accepts, in registry order."""
    return tuple(n for n, s in STRATEGIES.items() if kind_name in s.kinds)


def check_strategy(name: str, kind_name: str) -> Strategy:
    """The strategy entry, if ``kind_name`` accepts it; UnknownNameError otherwise."""
    accepted = strategies_of(kind_name)
    if name not in accepted:
        raise UnknownNameError("truncation strategy" if kind_name == "truncated" else f"{kind_name} strategy",
                               name, accepted)
    return STRATEGIES[name]


def default_conditions() -> list[str]:
    """What a config without ``extract.conditions`` runs: every kind that needs no options."""
    return [n for n, k in KINDS.items() if k.default]


def option_names() -> tuple[str, ...]:
    """Every ExtractConfig field some kind reads, in registry order."""
    return tuple(dict.fromkeys(o for k in KINDS.values() for o in k.options))


def validate_extract(e) -> None:
    """The condition checks of ``load_config``: names, then each kind's options (``used``: it is run)."""
    _check(isinstance(e.conditions, list) and bool(e.conditions), "extract.conditions", "a non-empty list",
           e.conditions)
    for c in e.conditions:
        _check(c in KINDS, "extract.conditions", f"a list of {list(KINDS)}", c)
    options = {o: getattr(e, o) for o in option_names()}
    for entry in KINDS.values():
        entry.validate(entry, options, entry.name in e.conditions)


def kinds_in_group(group: str) -> tuple[str, ...]:
    if group not in GROUPS:
        raise UnknownNameError("condition group", group, GROUPS)
    return tuple(n for n, k in KINDS.items() if k.group == group)


def in_group(kinds, group: str) -> list[bool]:
    """Per condition kind (e.g. a store's ``condition_kind`` values): is it in ``group``? Unknown kinds: no."""
    members = set(kinds_in_group(group))
    return [str(k) in members for k in kinds]


def parse_label(label: str) -> Condition:
    """The store entry a label names (the label rules' inverse); UnknownNameError if none matches."""
    for entry in KINDS.values():
        cond = entry.parse(entry, str(label))
        if cond is not None and cond.label == label:
            return cond
    raise UnknownNameError("condition label", str(label), KINDS)


def label_in_group(label: str, group: str) -> bool:
    """Whether a condition label (a summary key, say) names an entry of ``group``; False for other strings."""
    try:
        return parse_label(label).group == group
    except UnknownNameError:
        return False


def expand(names, truncation_layers=(), strategies=("zero",), n_layers: int | None = None,
           **options) -> list[Condition]:
    """Condition names from a config -> the ordered store entries.

    ``options``: further kind options by ExtractConfig field name (``truncation_layers`` and
    ``truncation_strategies`` are the two positional ones).

    >>> [c.label for c in expand(["original", "truncated"], [-1, 2], ["zero", "drop"])]
    ['original', 'truncated_zero_Lm1', 'truncated_zero_L2', 'truncated_drop_Lm1', 'truncated_drop_L2']
    """
    options = {"truncation_layers": truncation_layers, "truncation_strategies": strategies, **options}
    out: list[Condition] = []
    for name in names:
        entry = kind(name)
        out.extend(entry.expand(entry, options, n_layers))
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"The 'conditions' parameter must not repeat a condition. Got {labels} instead.")
    return out


def expand_config(e, n_layers: int | None = None) -> list[Condition]:
    """``expand`` with every option the kinds read taken from an ExtractConfig ``e``."""
    opts = {o: getattr(e, o) for o in option_names()}
    return expand(e.conditions, opts.pop("truncation_layers", ()), opts.pop("truncation_strategies", ()),
                  n_layers, **opts)


#: the store's root attribute that lists the decoder layers followed by a deepstack add (Qwen3-VL; [] = none)
DEEPSTACK_ATTR = "deepstack_layers"
DEEPSTACK_RULE = (
    "deepstack (Qwen3-VL) adds features of early vision blocks at the visual positions after decoder layers d in "
    "deepstack_layers (the stream entering d + 1 includes them). Interventions are forward pre-hooks on layer "
    "inputs, so an add after a hooked layer is overwritten at the next hooked layer's input; an add after the "
    "last hooked layer l_last is not. A condition is flagged when it changes the visual states (not drop, which "
    "masks keys) and some d with l_last <= d < n_layers - 1 exists (an add after the last decoder layer reaches "
    "no later layer): single-layer visual patching at l <= max(deepstack_layers), a window a..b with b <= "
    "max(deepstack_layers); truncation (hooked up to the last layer) never. The image then re-enters the visual "
    "positions from layer d + 1 on: Delta_visual(l) measures a removal for layers l..d only")


def deepstack_readds(c: Condition, n_layers: int, deepstack_layers) -> tuple[int, ...]:
    """The deepstack layers d whose add (after decoder layer d, at the visual positions) follows the last layer
    input that ``c`` intervenes on and is read by a later decoder layer, so that image information enters the
    intervened visual states again (:data:`DEEPSTACK_RULE`); () when none: no hook, a hook on the attention
    (``drop``) or on the question's tokens, or no deepstack add after its last hooked layer."""
    hook = c.hook(n_layers)
    if hook is None or not hook.layers or hook.positions != "visual" or strategy(hook.strategy).acts_on != "states":
        return ()
    last = max(hook.layers)
    return tuple(int(d) for d in sorted(deepstack_layers) if last <= int(d) < n_layers - 1)


def condition_params(facts: RunFacts) -> dict:
    """The store's ``condition_params``: each kind's recorded parameters, in registry order."""
    out = {}
    for name, entry in KINDS.items():
        value = entry.params(facts)
        if value is not None:
            out[name] = value
    return out


def reference_label() -> str:
    """The label of the clean condition every paired comparison is made against (the one kind of group CLEAN)."""
    clean = kinds_in_group(CLEAN)
    if len(clean) != 1:
        raise ConfigError(f"The condition registry must have exactly one kind in group {CLEAN!r}. Got {list(clean)}.")
    return Condition(clean[0]).label


#: the reference condition's label ("original"), for the analysis' paired comparisons
REFERENCE = reference_label()
