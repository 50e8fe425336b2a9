"""Run configs: plain values, validated in one place (``load_config``).

A config is YAML (see ``configs/``) or a dict with the sections below; unknown keys are errors
that name the key and list the allowed ones. ``DEMO`` is the embedded default that
``gapcache demo`` runs (``configs/demo.yaml`` is the same, pinned by a test).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from gapcache import conditions as conditions_mod
from gapcache import variants
from gapcache.errors import ConfigError

VISUAL_MODES = ("all", "subset", "pool")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    family: str = "llava"
    id: str = ""  # hub id or local directory; "builtin:tiny-llava-shapes" = the shipped trained model, "builtin:tiny-llava" = random weights
    revision: str | None = None
    dtype: str = "float32"
    device_map: str | None = None  # e.g. "auto" (accelerate), "cuda:0"; None = CPU
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    split: str | None = "test"
    path: str | None = None
    limit: int | None = None
    options: dict = field(default_factory=dict)


@dataclass
class VisualConfig:
    mode: str = "all"  # all | subset (seeded random subset of k tokens) | pool (k contiguous mean pools)
    k: int | None = None
    seed: int = 0


@dataclass
class GenerateConfig:
    enabled: bool = False
    max_new_tokens: int = 16


#: field metadata of options added after the first release: left out of the config hash while at their
#: default, so configs (and the stores made from them) that do not use the option keep their hash
ADDED = {"hash": "unless_default"}
#: a field that only says how a run writes, never what it records: out of the config hash whatever its value
RUN_ONLY = {"hash": "never"}


def _hashed(obj) -> dict:
    """``obj`` (a config section) as hashed: ADDED fields at their default value left out."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("hash") == "never":  # how a run writes, not what it records (resume never refused)
            continue
        if f.metadata.get("hash") == "unless_default":
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value == default:
                continue
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


@dataclass
class ExtractConfig:
    # the registry's default kinds (truncated needs truncation_layers, so it is opt-in)
    conditions: list = field(default_factory=conditions_mod.default_conditions)
    truncation_layers: list = field(default_factory=list)
    truncation_strategies: list = field(default_factory=lambda: ["zero", "drop"])
    layers: object = "all"  # "all" or a list of hidden-state indices (0 = embedding output)
    visual: VisualConfig = field(default_factory=VisualConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    batch_size: int = 8
    max_length: int = 4096
    samples_per_shard: int = 32
    visual_chunk_tokens: int = 64
    # the older compression knob, used when compression is null: 0 = none, n = zstd n, 1 (its default) = auto
    compression_level: int = 1
    seed: int = 0  # derangement of blind_randomimage
    # [[a, b], ...]: the window kind's decoder layers a..b
    truncation_windows: list = field(default_factory=list, metadata=ADDED)
    window_strategies: list = field(default_factory=lambda: ["zero", "drop"], metadata=ADDED)
    soft_seed: int = field(default=0, metadata=ADDED)  # noise and permutations of the soft-truncation strategies
    soft_pca_k: int = field(default=16, metadata=ADDED)  # principal directions of pca_noise
    # single-layer patching (kind patched): decoder layers l, channels, strategies (swap: visual channel only)
    patch_layers: list = field(default_factory=list, metadata=ADDED)
    patch_channels: list = field(default_factory=lambda: ["visual", "text"], metadata=ADDED)
    patch_strategies: list = field(default_factory=lambda: ["zero", "gaussian", "norm_noise", "mean", "swap"],
                                   metadata=ADDED)
    disk_bandwidth_mb_s: float = 500.0  # what --dry-run compares the need against
    forward_seconds_per_batch: float | None = None  # for --dry-run; measured by --check when absent
    # "sites": the text sites only; "all": also every prompt text token, ragged per sample (the store's token span)
    text: str = field(default="sites", metadata=ADDED)
    attention: bool = field(default=False, metadata=ADDED)  # attention summaries at the query sites (attn_mass, attn_visual)
    # MoE families: record router top-k at the text sites and expert-load histograms
    routing: bool = field(default=False, metadata=ADDED)
    # surface variants pooled into each candidate's score by logsumexp (gapcache.variants.RULES: case, space)
    candidate_variants: list = field(default_factory=list, metadata=ADDED)
    # hidden-state compression (gapcache.store.codec.parse_compression): "auto" (zstd:1 for bf16/float16 states,
    # blosc:lz4:5:shuffle for float32: gapcache.store.codec.AUTO_COMPRESSION), "zstd:1", "none",
    # "blosc:lz4:9:bitshuffle:32768", ...; null: compression_level decides (1, its default, = auto)
    compression: str | None = field(default=None, metadata=ADDED)
    # shard files written past the page cache (O_DIRECT) where the filesystem allows; false: buffered writes
    # (try it on a network filesystem where synchronous direct writes are slow). Never in the config hash.
    direct_io: bool = field(default=True, metadata=RUN_ONLY)


@dataclass
class SlurmConfig:
    """How ``gapcache slurm plan|submit`` writes the jobs (see ``gapcache.slurm.plan``).

    null omits an option (partition, account, gpus, mem, time: the cluster's defaults apply)."""

    partition: str | None = "gpu"
    account: str | None = None
    gpus: str | None = "gpu:1"  # --gres value; null = no --gres (CPU-only clusters, test clusters)
    cpus_per_task: int = 8
    mem: str | None = "64G"
    time: str | None = "04:00:00"
    array_tasks: int | None = None  # array size; null = ceil(units / shards_per_task), units = conditions x shards
    shards_per_task: int = 1
    max_parallel: int | None = None  # at most this many array tasks at once (--array=0-N%K)
    requeue: bool = True  # --requeue, and requeue the task itself when signalled before its time limit
    signal_seconds: int = 120  # --signal=B:USR1@this: the warning before the time limit
    max_requeues: int = 20  # stop requeueing a task after this many restarts
    setup: list = field(default_factory=list)  # lines run before gapcache (module load, source venv)
    extra_sbatch: list = field(default_factory=list)  # extra "#SBATCH ..." options of the extraction array
    gapcache: str | None = None  # the gapcache command in jobs; null = this installation's absolute path
    results_dir: str = "results"  # default run directory: results/{model}/{dataset}/{name}
    analysis: bool = True  # chain the CPU analysis job after the array
    analysis_partition: str | None = "cpu"
    analysis_cpus: int = 4
    analysis_mem: str | None = "16G"
    analysis_time: str | None = "02:00:00"
    analysis_scheduler: str = "threads"  # gapcache analyze --scheduler
    analysis_args: list = field(default_factory=list)  # extra gapcache analyze arguments, e.g. ["--cliff-layer", "11"]
    analysis_extra_sbatch: list = field(default_factory=list)


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self, sections=("model", "data", "extract")) -> str:
        """sha256 of the sections that fix a store's content (not where or how it runs)."""
        d = {k: _hashed(getattr(self, k)) for k in sections}
        for k in ("disk_bandwidth_mb_s", "forward_seconds_per_batch", "batch_size"):
            d["extract"].pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: extract options that enter the config hash only when set (they came after stores were made without them)
#: extract options (ADDED) left out of the hash while at their default (and the RUN_ONLY ones, never in it)
HASH_OMITTED_AT_DEFAULT = tuple(f.name for f in fields(ExtractConfig) if f.metadata.get("hash") in ("unless_default", "never"))


DEMO = {
    "name": "demo",
    "model": {"family": "llava", "id": "builtin:tiny-llava-shapes", "dtype": "float32"},
    "data": {"dataset": "synthetic", "split": "test", "options": {"n": 192, "image_size": 64, "seed": 0, "placement": "centre"}},
    "extract": {
        "conditions": ["original", "blind_black", "blind_mean", "blind_randomimage", "truncated"],
        "truncation_layers": [-1, 0, 1, 2, 3],
        "truncation_strategies": ["zero", "drop"],
        "batch_size": 16,
        "samples_per_shard": 32,
        "max_length": 512,
    },
}


#: what ``gapcache demo`` records beyond DEMO (= configs/demo.yaml, whose hash a test pins): the attention
#: summaries and every prompt text token, so its report shows attention flow, CKA / ICC and the checkpoints
#: on a first run; ``gapcache demo --plain`` runs DEMO exactly
DEMO_RECORDS = {"attention": True, "text": "all"}
#: and the seed's intervention suite on the tiny model's 4 layers (issue 13): every registered strategy of it,
#: so its report leads with the transfer window and shows every strategy's curves. Soft truncation
#: (norm_noise, pca_noise, mean, shuffle) beside zero / drop at DEMO's truncation layers -1..3; windows [0, 1]
#: and [2, 3] with zero and drop; single-layer patching at layers 0..3 of the visual channel (zero, gaussian,
#: norm_noise, mean, swap) and of the question's tokens (the same but swap): 74 conditions. One shard per
#: condition (samples_per_shard 192 = DEMO's n) instead of DEMO's six: 74 shard files, not 444 (the suite's keys
#: apply to the non-plain demo only, so DEMO's hash is untouched). The tests hold it to every strategy of the
#: registry (tests/test_config.py).
DEMO_SUITE = {
    "conditions": DEMO["extract"]["conditions"] + ["window", "patched"],
    "truncation_strategies": ["zero", "drop", "norm_noise", "pca_noise", "mean", "shuffle"],
    "truncation_windows": [[0, 1], [2, 3]],
    "window_strategies": ["zero", "drop"],
    "patch_layers": [0, 1, 2, 3],
    "patch_channels": ["visual", "text"],
    "patch_strategies": ["zero", "gaussian", "norm_noise", "mean", "swap"],
    "samples_per_shard": 192,
}
#: torch threads of the demo's forwards (a 0.9M-parameter model, too small to gain from more): on the 2 shared
#: cores at load ~5 the suite's extraction took 49 s on one thread and 409 s on torch's default two (threads
#: spinning against other processes); tests/test_known_answers.py runs the same model on one thread too
DEMO_TORCH_THREADS = 1


def demo_config(plain: bool = False) -> dict:
    """The config dict ``gapcache demo`` runs: DEMO, plus DEMO_RECORDS and DEMO_SUITE in its extract section
    unless ``plain``."""
    d = copy.deepcopy(DEMO)
    if not plain:
        d["extract"].update(copy.deepcopy({**DEMO_RECORDS, **DEMO_SUITE}))
    return d


def _build(cls, values, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"The '{where}' section must be a mapping. Got {type(values).__name__} instead.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {unknown} in '{where}'. Allowed keys: {', '.join(sorted(known))}."
        )
    kwargs = {}
    for name, value in values.items():
        sub = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(source) -> Config:
    """A Config from a YAML path, a dict or a Config; validated."""
    if isinstance(source, Config):
        cfg = source
    elif isinstance(source, dict):
        cfg = _build(Config, copy.deepcopy(source), "config")
    else:
        import yaml

        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist. Expected a YAML file like configs/demo.yaml.")
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {path} is not valid YAML: {err}") from None
        cfg = _build(Config, values or {}, "config")
    validate(cfg)
    return cfg


def _is_compression(value) -> bool:
    """Whether ``value`` is a compression setting string (gapcache.store.codec.parse_compression)."""
    from gapcache.store.codec import parse_compression

    try:
        return isinstance(value, str) and bool(parse_compression(value))
    except ValueError:
        return False


def _check(ok: bool, name: str, expected: str, got):
    if not ok:
        raise ConfigError(f"The '{name}' parameter must be {expected}. Got {got!r} instead.")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(cfg: Config) -> None:
    """Every value check of every section, in one place."""
    from gapcache.plugins import FAMILIES, names

    FAMILY_NAMES = names(FAMILIES)  # the adapters' registry, read from package metadata (no extract import)
    m, d, e = cfg.model, cfg.data, cfg.extract
    _check(m.family in FAMILY_NAMES, "model.family", f"one of {list(FAMILY_NAMES)}", m.family)
    _check(isinstance(m.id, str) and bool(m.id), "model.id", "a hub id or a local directory", m.id)
    _check(m.dtype in DTYPES, "model.dtype", f"one of {list(DTYPES)}", m.dtype)
    _check(m.attn_implementation in ("sdpa", "eager"), "model.attn_implementation", "'sdpa' or 'eager'",
           m.attn_implementation)
    _check(isinstance(d.dataset, str) and bool(d.dataset), "data.dataset", "a dataset name", d.dataset)
    _check(d.limit is None or (_is_int(d.limit) and d.limit > 0), "data.limit", "a positive int or null", d.limit)
    _check(isinstance(d.options, dict), "data.options", "a mapping", d.options)
    conditions_mod.validate_extract(e)  # names and every kind's options, from the registry
    _check(e.layers == "all" or (isinstance(e.layers, list) and e.layers and all(_is_int(x) and x >= 0 for x in e.layers)),
           "extract.layers", "'all' or a non-empty list of hidden-state indices >= 0", e.layers)
    _check(e.text in ("sites", "all"), "extract.text", "'sites' (the text sites only) or 'all' (every prompt text "
           "token too)", e.text)
    v = e.visual
    _check(v.mode in VISUAL_MODES, "extract.visual.mode", f"one of {list(VISUAL_MODES)}", v.mode)
    if v.mode != "all":
        _check(_is_int(v.k) and v.k > 0, "extract.visual.k", f"a positive int when mode is {v.mode!r}", v.k)
    for name in ("batch_size", "max_length", "samples_per_shard", "visual_chunk_tokens"):
        value = getattr(e, name)
        _check(_is_int(value) and value > 0, f"extract.{name}", "a positive int", value)
    _check(_is_int(e.compression_level) and 0 <= e.compression_level <= 22, "extract.compression_level",
           "an int in [0, 22] (0 = no compression)", e.compression_level)
    from gapcache.store.codec import COMPRESSION_FORMS

    _check(e.compression is None or _is_compression(e.compression), "extract.compression",
           f"null or one of {list(COMPRESSION_FORMS)}", e.compression)
    _check(_is_int(e.generate.max_new_tokens) and e.generate.max_new_tokens > 0,
           "extract.generate.max_new_tokens", "a positive int", e.generate.max_new_tokens)
    _check(isinstance(e.attention, bool), "extract.attention", "true or false", e.attention)
    _check(_is_int(e.soft_seed) and e.soft_seed >= 0, "extract.soft_seed", "a non-negative int", e.soft_seed)
    _check(_is_int(e.soft_pca_k) and e.soft_pca_k > 0, "extract.soft_pca_k", "a positive int", e.soft_pca_k)
    _check(isinstance(e.routing, bool), "extract.routing", "true or false", e.routing)
    _check(isinstance(e.direct_io, bool), "extract.direct_io", "true or false", e.direct_io)
    variants.check_rules(e.candidate_variants)
    _check(isinstance(e.disk_bandwidth_mb_s, (int, float)) and e.disk_bandwidth_mb_s > 0,
           "extract.disk_bandwidth_mb_s", "a positive number", e.disk_bandwidth_mb_s)
    validate_slurm(cfg.slurm)


def validate_slurm(s: SlurmConfig) -> None:
    for name in ("partition", "account", "gpus", "mem", "time", "gapcache", "analysis_partition", "analysis_mem",
                 "analysis_time"):
        value = getattr(s, name)
        _check(value is None or (isinstance(value, str) and value.strip() and "\n" not in value), f"slurm.{name}",
               "a non-empty one-line string or null", value)
    for name in ("cpus_per_task", "shards_per_task", "analysis_cpus"):
        value = getattr(s, name)
        _check(_is_int(value) and value > 0, f"slurm.{name}", "a positive int", value)
    _check(_is_int(s.max_requeues) and s.max_requeues >= 0, "slurm.max_requeues", "a non-negative int", s.max_requeues)
    for name in ("array_tasks", "max_parallel"):
        value = getattr(s, name)
        _check(value is None or (_is_int(value) and value > 0), f"slurm.{name}", "a positive int or null", value)
    _check(_is_int(s.signal_seconds) and 0 < s.signal_seconds <= 65535, "slurm.signal_seconds",
           "an int in [1, 65535] (seconds before the time limit)", s.signal_seconds)
    for name in ("requeue", "analysis"):
        _check(isinstance(getattr(s, name), bool), f"slurm.{name}", "true or false", getattr(s, name))
    for name in ("setup", "extra_sbatch", "analysis_args", "analysis_extra_sbatch"):
        value = getattr(s, name)
        _check(isinstance(value, list) and all(isinstance(x, str) and "\n" not in x for x in value),
               f"slurm.{name}", "a list of one-line strings", value)
    _check(isinstance(s.results_dir, str) and bool(s.results_dir), "slurm.results_dir", "a directory", s.results_dir)
    _check(isinstance(s.analysis_scheduler, str) and bool(s.analysis_scheduler), "slurm.analysis_scheduler",
           "threads | processes | ADDRESS | slurm", s.analysis_scheduler)
