"""The GPU tier's main loop: one model pass per condition, shard by shard, into the store.

Usage::

    gapcache extract configs/qwen3-vl-30b-a3b.yaml --out runs/q3      # or from Python:
    Extraction(load_config(path), out_dir).run()

Order: plan (processor only) -> create or reopen the store -> for each condition, for each
pending shard, batched forwards (right padding, teacher-forced gold answer appended) -> a
ShardPayload handed to the StoreWriter's background thread, so the model never waits on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
import torch

from gapcache import __version__
from gapcache.conditions import CLEAN, KINDS, NEEDS_DONOR, NEEDS_MEAN_RGB, Condition, RunFacts, condition_params, \
    expand_config, fitted_layers, kinds_in_group
from gapcache.conditions import DEEPSTACK_ATTR
from gapcache.conditions import strategy as strategy_entry
from gapcache.conditions import kind as condition_kind
from gapcache.errors import IncompatibleStoreError, SampleError, StopForward, StoreError, StoreLockedError
from gapcache.malloc import tune_malloc
from gapcache.extract import data as data_mod
from gapcache.extract import interventions
from gapcache.extract.attention import ARRAYS as ATTENTION_ARRAYS
from gapcache.extract.attention import AttentionSummaries
from gapcache.extract.hooks import Capture, hidden_of
from gapcache.extract.shardbuf import ShardBuffers
from gapcache.extract.transfer import HostPool, Transfer, as_storage, host_empty
from gapcache.extract import routing as routing_mod
from gapcache.extract.models import get_adapter, processor_fingerprint
from gapcache.extract.plan import Planner, candidate_table, donors, variant_table
from gapcache.extract.preflight import check_shard_memory, check_task, preflight
from gapcache.sites import POSITION_SITES, TOKEN_ROLES, position_row
from gapcache.store import Layout, ShardPayload, StoreWriter, arrays, create
from gapcache.store.locks import ShardLocks, clean_leftovers, owner_tag
from gapcache.store.schema import SITES, STATUS_DONE, STATUS_FAILED, STORE_NAME
from gapcache.store.writer import check_compatible, check_same_samples

log = logging.getLogger(__name__)
COMPAT_KEYS = ("config_hash", "model", "candidates", "condition_params")
FIT_WAIT_SECONDS = 5  # how often a task waiting for another's fitted statistics looks for the store


def progress(iterable, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)


class Extraction:
    """One run: a config, an output directory, a model loaded once."""

    def __init__(self, cfg, out_dir, model=None, processor=None):
        self.cfg, self.out = cfg, Path(out_dir)
        self.adapter = get_adapter(cfg.model.family)
        self.model, self.processor = model, processor
        self.store_path = self.out / STORE_NAME
        self._processor_lock = threading.Lock()
        self._stack_buffers: dict = {}  # CPU: Capture's stacks reused batch after batch (copied out in forward)

    # ------------------------------------------------------------------ setup
    def load(self):
        tune_malloc()  # freed activations kept for the next forward, not faulted in again (gapcache.malloc)
        if self.model is None:
            self.model, self.processor = self.adapter.load(self.cfg.model)
        self.processor.tokenizer.padding_side = "right"
        self.n_layers = self.adapter.n_layers(self.model)
        if self.cfg.extract.routing:
            routing_mod.check_routing(self.adapter, self.model)
        self.conditions = expand_config(self.cfg.extract, self.n_layers)
        self.fitted = None  # statistics fitted on original (soft truncation): fitted_statistics()
        layers = self.cfg.extract.layers
        self.record = list(range(self.n_layers + 1)) if layers == "all" else sorted(set(layers))
        if self.record[-1] > self.n_layers:
            raise StoreError(f"extract.layers asks for hidden-state index {self.record[-1]}, but the model has "
                             f"{self.n_layers} decoder layers (indices 0..{self.n_layers}).")
        return self

    def samples(self):
        d = self.cfg.data
        return data_mod.load_dataset(d.dataset, split=d.split, limit=d.limit, path=d.path, **d.options)

    def plan(self, samples=None, show=True):
        samples = self.samples() if samples is None else samples
        self.planner = Planner(self.adapter, self.model, self.processor, self.cfg.extract.max_length)
        it = progress(enumerate(samples), total=len(samples), desc="plan", disable=not show)
        self.planned = [self.planner.plan(i, s) for i, s in it]
        self.candidates, self.cand_mask = candidate_table(self.planner, self.planned, self.cfg.extract.candidate_variants)
        ok = [p.pixel_sum for p in self.planned if p.ok]  # images decoded once, while planning
        need_mean = any(condition_kind(c).image in NEEDS_MEAN_RGB for c in self.cfg.extract.conditions)
        self.mean_rgb = data_mod.mean_of_sums(ok) if need_mean and ok else None
        self.donor = donors(self.planned, self.cfg.extract.seed)
        self.visual_select = [self._visual_selection(p) for p in self.planned]
        return self.planned

    def _visual_selection(self, p):
        """Indices within the span to record (mode subset) or pool groups (mode pool)."""
        v = self.cfg.extract.visual
        n = p.visual_length
        if v.mode == "all" or n == 0:
            return np.arange(n)
        if v.mode == "subset":
            if n <= v.k:
                return np.arange(n)
            rng = np.random.default_rng([v.seed, int(p.image_sha256[:8] or "0", 16), p.index])
            return np.sort(rng.choice(n, v.k, replace=False))
        return np.array_split(np.arange(n), min(v.k, n))  # pool: k contiguous groups

    def layout(self) -> Layout:
        e = self.cfg.extract
        lengths = tuple(len(sel) for sel in self.visual_select)
        return Layout(
            sample_ids=tuple(p.sample.id for p in self.planned), conditions=tuple(self.conditions),
            layers=tuple(self.record), hidden=self.adapter.hidden_size(self.model), model_dtype=self.cfg.model.dtype,
            candidates=self.candidates, visual_lengths=lengths, samples_per_shard=e.samples_per_shard,
            visual_chunk_tokens=e.visual_chunk_tokens, compression_level=e.compression_level,
            compression=e.compression,
            span_lengths=(("token", tuple(len(self.token_positions(p)) for p in self.planned)),)
            if self.text_tokens else (),
            routing=tuple(self.adapter.routing_shape(self.model.config)) if e.routing else (),
        )

    @property
    def text_tokens(self) -> bool:
        """Whether this run records every prompt text token (``extract.text: all``: the store's token span)."""
        return self.cfg.extract.text == "all"

    @staticmethod
    def token_positions(p) -> list[int]:
        """The prompt positions of the token span: every prompt token outside the visual span ([] if failed)."""
        if not p.ok:
            return []
        v0, n = p.visual_start, p.visual_length
        return [t for t in range(len(p.prompt_ids)) if not v0 <= t < v0 + n]

    def token_values(self) -> tuple[dict, dict]:
        """Creation-time arrays of the token span: each row's vocabulary id and role (gapcache.sites.TOKEN_ROLES:
        a special/template token of the tokenizer, a token of the question's content span, or other template text)."""
        ids, roles = [], []
        special = self.planner.special_ids
        for p in self.planned:
            q0, qn = p.sites.get("question", (-1, 0))
            for t in self.token_positions(p):
                tok = int(p.prompt_ids[t])
                ids.append(tok)
                role = "special" if tok in special else "question" if q0 <= t < q0 + qn else "template"
                roles.append(TOKEN_ROLES.index(role))
        layout = self.layout()
        span = layout.spans["token"]
        out_id = np.full(span.n_tokens, -1, np.int32)
        out_role = np.full(span.n_tokens, -1, np.int8)
        k = 0
        for i, n in enumerate(span.lengths):
            out_id[span.offsets[i] : span.offsets[i] + n] = ids[k : k + n]
            out_role[span.offsets[i] : span.offsets[i] + n] = roles[k : k + n]
            k += n
        return {"ttoken_id": out_id, "ttoken_role": out_role}, {"ttoken_role": {"roles": list(TOKEN_ROLES)}}

    def store_attrs(self) -> dict:
        import transformers

        cfg, m = self.cfg, self.model
        return {
            "config_hash": cfg.hash(),
            "config": cfg.to_dict(),
            "model": {"id": cfg.model.id, "revision": cfg.model.revision, "family": cfg.model.family,
                      "class": type(m).__name__, "dtype": cfg.model.dtype, "n_layers": self.n_layers,
                      "hidden": self.adapter.hidden_size(m), "name_or_path": str(m.config._name_or_path)},
            "dataset": {"name": cfg.data.dataset, "split": cfg.data.split, "n_samples": len(self.planned)},
            "candidates": list(self.candidates),
            "candidate_scoring": "exact: sum over the candidate's tokens (answer_prefix included) of teacher-forced "
                                 "log p(token | prompt, earlier candidate tokens) from the prediction site; read "
                                 "from the gold answer's forward where the candidate's earlier tokens are a prefix "
                                 "of the gold's, else from one extra forward of prompt + candidate (same condition)",
            "candidate_variants": self.variants_record(),
            "answer_prefix": self.adapter.answer_prefix,
            # decoder layers after which the model adds visual features again (Qwen3-VL deepstack; [] = none): the
            # CPU tier flags the interventions an add follows (conditions.deepstack_readds, DEEPSTACK_RULE)
            DEEPSTACK_ATTR: [int(d) for d in self.adapter.deepstack_layers(m)],
            "gold_logprob": "sum over answer tokens of teacher-forced log p(token | prefix); count in gold_ntokens",
            "visual": {"mode": cfg.extract.visual.mode, "k": cfg.extract.visual.k, "seed": cfg.extract.visual.seed},
            **({"routing": {"rule": self.adapter.routing_rule, "sites": list(SITES), "modality": list(arrays.MODALITIES),
                            "load": "top-k assignments per expert: visual = the visual span, text = every other "
                                    "prompt position (teacher-forced answer and padding not counted)"}}
               if cfg.extract.routing else {}),
            "condition_params": condition_params(RunFacts(cfg.extract, self.mean_rgb, tuple(self.donor.tolist()),
                                                          self.ensure_fitted())),
            "provenance": {
                "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
                "gapcache": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **processor_fingerprint(self.processor),
            },
        }

    def variants_record(self):
        """The store's record of surface-variant pooling (root attribute ``candidate_variants``)."""
        rules = list(self.cfg.extract.candidate_variants)
        if not rules:
            return "none (each candidate scored as written; no surface-variant pooling)"
        table = variant_table(self.planner, self.candidates, rules)
        return {"rules": rules, "pooling": "logsumexp of the exact log-probs of the distinct variants (equal token "
                                           "ids counted once); gold_logprob stays the as-written gold answer's",
                "variants": {c: [v for v, _ in table[c]] for c in self.candidates}}

    def sample_meta(self) -> dict:
        P = self.planned
        col = lambda f: np.array([f(p) for p in P], dtype=object)  # noqa: E731
        return {
            "dataset_name": col(lambda p: p.sample.dataset), "split": col(lambda p: p.sample.split),
            "category": col(lambda p: p.sample.category), "question": col(lambda p: p.sample.question),
            "answer": col(lambda p: p.sample.answer),
            "answers": col(lambda p: json.dumps(list(p.sample.answers), ensure_ascii=False)),
            "image_sha256": col(lambda p: p.image_sha256),
            "failure": col(lambda p: p.failure),
            "label": np.array([p.sample.label for p in P], np.int32),
            "seq_len": np.array([len(p.prompt_ids) for p in P], np.int32),
            "visual_start": np.array([p.visual_start for p in P], np.int32),
            "span_length": np.array([p.visual_length for p in P], np.int32),
            "gold_ntokens": np.array([len(p.answer_ids) for p in P], np.int32),
            "site_position": np.array([position_row(p.sites) for p in P], np.int32).reshape(-1, len(POSITION_SITES)),
            "candidate_mask": self.cand_mask,
            "candidate_prefix_tokens": np.array([p.cand_prefix for p in P], np.int32),
            "donor": self.donor.astype(np.int64),
        }

    def open_or_create(self):
        """Create the store, or check that an existing one was made by this same config (resume).

        Creation is atomic: the store is built in a temporary directory (one ``create`` call: every array,
        the lens tables included) and renamed into place, so that concurrent array tasks racing to create
        it end with exactly one complete store.
        """
        attrs = self.store_attrs()
        if not (self.store_path / "zarr.json").is_file():
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / f".{STORE_NAME}.{owner_tag()}.tmp"  # its owner: a resume removes it if that one died
            shutil.rmtree(tmp, ignore_errors=True)
            layout = self.layout()
            lens, lens_attrs = self.lens_values()
            values = {**self.sample_meta(), **lens, **self.fitted_values()}
            array_attrs = {"lens_norm_weight": lens_attrs}
            if self.cfg.extract.attention:  # attention summaries (issue 14): their coordinates create the arrays
                values.update(self.attention_coords())
            if self.cfg.extract.visual.mode != "all":
                values["vtoken_position"] = self.vtoken_positions(layout)
            if self.text_tokens:
                token, token_attrs = self.token_values()
                values.update(token)
                array_attrs.update(token_attrs)
            try:
                create(tmp, layout, attrs, values, array_attrs=array_attrs)
            except OSError as err:  # disk full, quota, permissions: one line, nothing left behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreError(f"Could not create the store in '{self.out}': {err.strerror or err} "
                                 f"(writing '{err.filename or tmp}'). Free space or pass another --out.") from None
            try:
                os.rename(tmp, self.store_path)
                return True
            except OSError:  # another task created it first
                shutil.rmtree(tmp, ignore_errors=True)
        meta = self.sample_meta()
        try:  # samples first: a changed image names its sample (and what it changed: mean_rgb, donors)
            check_same_samples(self.store_path, [p.sample.id for p in self.planned], meta)
        except IncompatibleStoreError as err:
            from gapcache.store.reader import root_attrs
            from gapcache.store.writer import describe_differences, differences

            stored = root_attrs(self.store_path).get("condition_params")
            diffs = differences(stored, attrs["condition_params"], "condition_params")
            if diffs:
                raise IncompatibleStoreError(f"{err} Through it, {describe_differences(diffs)}.") from None
            raise
        check_compatible(self.store_path, attrs, COMPAT_KEYS)
        return False

    def lens_values(self) -> tuple[dict, dict]:
        """What a CPU logit lens needs: the final norm and the unembedding rows of the candidates, and the
        norm's attributes.

        ``lens_unembed[t] @ rmsnorm(h)`` with ``rmsnorm(h) = (offset + w) * h / sqrt(mean(h**2) + eps)`` (the
        adapter's ``lens_norm``; offset 0 for Llama/Qwen RMSNorm, 1 for Gemma-style norms) gives the
        logit of ``lens_token_id[t]``; ``candidate_lens_token[i, c]`` is the row scoring candidate c
        of sample i (its first distinguishing token; -1 if c is not among the sample's candidates).
        """
        norm = self.adapter.lens_norm(self.model)
        head = self.model.get_output_embeddings().weight  # (vocab, hidden)
        tokens = sorted({t for p in self.planned for t in p.cand_tokens})
        row = {t: r for r, t in enumerate(tokens)}
        which = np.full(self.cand_mask.shape, -1, np.int32)
        for p in self.planned:
            for c, t in zip(p.cand_columns, p.cand_tokens):
                which[p.index, c] = row[t]
        attrs = {k: norm[k] for k in ("norm_class", "eps", "offset", "formula")}
        h = head.shape[1]
        values = {
            "lens_norm_weight": norm["weight"],  # (hidden,)
            "lens_token_id": np.array(tokens, np.int64),  # (lens_token,)
            "lens_unembed": head[tokens].detach().float().cpu().numpy().reshape(len(tokens), h),  # (lens_token, hidden)
            "candidate_lens_token": which,  # (sample, candidate)
        }
        return values, attrs

    def vtoken_positions(self, layout) -> np.ndarray:
        """Index within the visual span of each recorded row (subset), or of its pool's first token."""
        pos = np.full(layout.n_vtokens, -1, np.int32)
        for i, sel in enumerate(self.visual_select):
            first = [g[0] for g in sel] if isinstance(sel, list) else list(sel)
            pos[layout.visual_offsets[i] : layout.visual_offsets[i] + len(first)] = first
        return pos

    # ------------------------------------------------------------------ run
    def units(self, layout, task_index: int | None = None, n_tasks: int | None = None) -> list[tuple[int, int]]:
        """(condition index, shard) work units, in order; a task of an array takes every n-th one."""
        all_units = [(ci, shard) for ci in range(len(self.conditions)) for shard in range(layout.n_shards)]
        if task_index is None:
            return all_units
        check_task(task_index, n_tasks)
        return all_units[task_index::n_tasks]

    def run(self, show=True, task_index: int | None = None, n_tasks: int | None = None):
        """Extract every pending (condition, shard) unit of this task; rerun to resume.

        A new store is created in a thread while the first shard's forwards run (unless soft-truncation
        statistics must be fitted and shared first); an existing one is checked before any forward."""
        preflight(self.cfg, self.out, task_index, n_tasks)  # again: cheap, and for callers of run() alone
        if not hasattr(self, "planned"):
            self.load().plan(show=show)
        self.check_planned()
        layout = self.layout()
        mine = self.units(layout, task_index, n_tasks)
        clean_leftovers(self.out, self.store_path)  # of dead writers only, never a live one's
        creating = self.create_in_background(layout) if self.creatable_in_background() else None
        if creating is None:
            self.open_store()
        locks_dir = self.out / "locks"
        new_locks = not locks_dir.exists()
        try:
            # the writer closes (flushing every shard) before the locks are released
            with ShardLocks(self.out / "locks") as locks, contextlib.ExitStack() as stack:
                writer = None if creating else stack.enter_context(self.open_writer())
                todo = mine if writer is None else self.pending_units(writer, mine)
                for ci, shard in progress(todo, desc="extract", disable=not show, unit="shard"):
                    cond = self.conditions[ci]
                    locks.acquire(f"{cond.label}.shard{shard:05d}")
                    payload = self.shard_payload(ci, cond, shard, layout)
                    if writer is None:  # the first shard is done: the store must be too
                        creating.result()
                        writer = stack.enter_context(self.open_writer(expect=self.store_arrays))
                        if (ci, shard) not in self.pending_units(writer, [(ci, shard)]):
                            payload.release()  # another task of the array wrote it meanwhile (raced creation)
                            continue
                    writer.submit(payload)
                if writer is None and creating is not None:  # no unit to do: the store is still made
                    creating.result()
        except BaseException:  # a store that could not be created leaves no empty locks folder behind either
            if creating is not None and new_locks and locks_dir.is_dir() and not any(locks_dir.iterdir()):
                locks_dir.rmdir()
            raise
        return self.store_path

    def creatable_in_background(self) -> bool:
        """A new store (none in place yet) whose creation needs nothing shared first (no fitted statistics)."""
        return not (self.store_path / "zarr.json").is_file() and not self.fit_layers()

    def create_in_background(self, layout):
        """Start creating the store in a thread; returns its future. Meanwhile ``store_arrays`` is what the new
        store will hold (checked against it when the writer opens)."""
        from concurrent.futures import ThreadPoolExecutor

        sizes = self.unit_sizes(layout)
        self.store_arrays = {s.name for s in arrays.specs((arrays.UNIT, arrays.VUNIT))
                             if (not s.span or layout.has_span(s.span)) and (s.required or set(s.dims) <= set(sizes))}
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gapcache-create")
        try:
            return pool.submit(self.open_store)
        finally:
            pool.shutdown(wait=False)

    def open_store(self):
        """Create or check the store, holding the fitted-statistics lock meanwhile; load its fitted statistics."""
        fit_lock = self.share_fitted()
        if self.fitted is None and self.fit_layers() and (self.store_path / "zarr.json").is_file():
            self.fitted = self.read_fitted()  # its condition_params record them (patched: sigma); compared next
        try:
            self.open_or_create()
        finally:
            if fit_lock is not None:
                fit_lock.release()
        self.fitted = self.read_fitted()  # every task substitutes from the store's statistics, never its own

    @contextlib.contextmanager
    def open_writer(self, expect: set | None = None):
        """The store's writer (healed flag records); ``store_arrays`` is the unit arrays it holds."""
        with StoreWriter(self.store_path, direct_io=self.cfg.extract.direct_io) as writer:
            # StoreWriter.__enter__ healed the flag records a killed writer left unrecorded
            held = set(writer.arrays)  # the unit arrays this store holds (optional ones included)
            if expect is not None and held != expect:
                raise StoreError(f"The store {self.store_path} holds the unit arrays {sorted(held)}, not the "
                                 f"{sorted(expect)} its first shard was computed for (a gapcache bug: report it).")
            self.store_arrays = held
            yield writer

    @staticmethod
    def pending_units(writer, units) -> list[tuple[int, int]]:
        """The (condition, shard) units of ``units`` that the store still lacks."""
        pending = {ci: set(writer.pending(ci)) for ci in {ci for ci, _ in units}}
        return [(ci, shard) for ci, shard in units if shard in pending[ci]]

    # ------------------------------------------------------------------ statistics fitted on original
    def fit_layers(self) -> dict[str, tuple[int, ...]]:
        return fitted_layers(self.conditions, self.n_layers)

    def share_fitted(self):
        """Before the store exists: the one task that creates it fits the statistics (holding the lock
        ``locks/fitted_statistics.lock`` until the store, with them in it, is in place); every other task of
        an array waits for the store and reads them from it. Returns the held lock (or None)."""
        if not self.fit_layers():
            return None
        locks, told = ShardLocks(self.out / "locks"), False
        while not (self.store_path / "zarr.json").is_file():
            try:
                locks.acquire("fitted_statistics")
            except StoreLockedError:
                if not told:
                    log.info("another task is fitting the soft-truncation statistics; waiting for the store")
                    told = True
                time.sleep(FIT_WAIT_SECONDS)
                continue
            if not (self.store_path / "zarr.json").is_file() and self.fitted is None:
                self.fitted = self.fitted_statistics()
            return locks
        return None

    def ensure_fitted(self):
        """Fit the statistics now if a condition needs them and they are not loaded (direct forward() calls)."""
        if self.fitted is None and self.fit_layers():
            self.fitted = self.fitted_statistics()
        return self.fitted

    def fitted_values(self) -> dict:
        """The store arrays of the fitted statistics (none if no condition needs them)."""
        if not self.fit_layers():
            return {}
        f = self.ensure_fitted()
        layers = sorted(f.layers, key=f.layers.get)
        return {"fit_layer": np.array(layers, np.int32), **{f"fit_{k}": v for k, v in f.values.items()}}

    def read_fitted(self):
        """The fitted statistics recorded in the store (None if no condition needs them)."""
        need = self.fit_layers()
        if not need:
            return None
        import zarr

        g = zarr.open_group(str(self.store_path), mode="r")
        names = ["mean"] + (["pca_basis", "pca_variance"] if "pca" in need else []) \
            + [n for n in ("sigma", "question_mean", "question_sigma") if n in need]
        missing = [f"fit_{n}" for n in ["layer"] + names if f"fit_{n}" not in g]
        if missing:
            raise StoreError(f"The store {self.store_path} lacks the fitted statistics {missing} that its soft "
                             "truncation conditions need (made by an older gapcache?). Extract into a new --out.")
        layers = [int(x) for x in g["fit_layer"][...]]
        short = sorted(set().union(*need.values()) - set(layers))
        if short:
            raise StoreError(f"The store's fitted statistics cover layers {layers}, not {short}.")
        from gapcache.extract.interventions import Fitted

        return Fitted(layers, {n: np.asarray(g[f"fit_{n}"][...]) for n in names})

    @torch.inference_mode()
    def fitted_statistics(self):
        """Pre-pass: forwards of original over every extractable sample (batches of ``extract.batch_size`` in
        sample order, whatever the task), accumulating in float64 on the device, at the input of each layer
        a fitting strategy acts on: over the full visual span the mean, the std of every entry (sigma) and
        (pca_noise) the population covariance's top ``soft_pca_k`` eigenvectors and eigenvalues; over the
        question's content tokens (patched text channel) their mean and sigma."""
        from gapcache.extract.interventions import Fitted

        need = self.fit_layers()
        layers = sorted(set().union(*need.values()))
        clean = Condition(kinds_in_group(CLEAN)[0])
        todo = [p.index for p in self.planned if p.ok and p.visual_length]
        if not todo:
            raise SampleError(self.planned[0].sample.id if self.planned else "-",
                              "no extractable sample with visual tokens to fit the soft-truncation statistics on")
        groups = ["visual"] + (["question"] if any(k.startswith("question_") for k in need) else [])
        acc = {g: FitSums("pca" in need and g == "visual") for g in groups}
        where = {}

        def hook_at(layer):
            def hook(module, args, kwargs):
                h = hidden_of(args, kwargs)
                for g in groups:
                    rows, pos = where[g]
                    acc[g].add(layer, h[rows.to(h.device), pos.to(h.device)].double())  # (n, hidden)
            return hook

        decoder = self.adapter.decoder_layers(self.model)
        handles = [decoder[l].register_forward_pre_hook(hook_at(l), with_kwargs=True) for l in layers]
        bs, device = self.cfg.extract.batch_size, self.model.device
        try:
            for b0 in range(0, len(todo), bs):
                idx = todo[b0 : b0 + bs]
                P = [self.planned[i] for i in idx]
                inputs = self.batch_inputs(idx, clean)
                for g in groups:
                    where[g] = interventions.positions(P, g, [0] * len(P), inputs).index
                self.model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()},
                           use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        values = {"mean": acc["visual"].means(layers)}
        if "pca" in need:
            values.update(zip(("pca_basis", "pca_variance"), acc["visual"].pca(layers, self.cfg.extract.soft_pca_k)))
        if "sigma" in need:
            values["sigma"] = acc["visual"].sigmas(layers)
        if "question" in acc:
            values.update(question_mean=acc["question"].means(layers), question_sigma=acc["question"].sigmas(layers))
        return Fitted(layers, values)

    def check_planned(self) -> None:
        """Before the store is created: some sample must be extractable, and a shard's payload, now that
        the visual-token counts are known, must fit in memory."""
        if self.planned and not any(p.ok for p in self.planned):
            first = self.planned[0]
            raise SampleError(first.sample.id, f"failed planning, and so did every one of the {len(self.planned)} "
                                               f"samples (first reason: {first.failure}). Nothing to extract; fix "
                                               "the config (extract.max_length?) or the data.")
        layout = self.layout()
        most = max((sum(layout.visual_lengths[i] for i in layout.shard_samples(k)) for k in range(layout.n_shards)),
                   default=0)
        visual = most if any(c.records_visual for c in self.conditions) else 0
        check_shard_memory(self.cfg.extract.samples_per_shard, len(self.record), layout.hidden,
                           self.cfg.model.dtype, visual)

    def unit_arrays(self, cond, layout) -> list[str]:
        """The unit arrays a (condition, shard) payload of this run fills: the UNIT arrays the store holds (an
        optional one only when this run records it), and the states of every span the layout holds and ``cond``
        records."""
        held = getattr(self, "store_arrays", None)
        names = [s.name for s in arrays.specs(arrays.UNIT) if (s.required if held is None else s.name in held)]
        if not self.cfg.extract.generate.enabled:
            names.remove("generation")
        if not self.cfg.extract.routing:
            names = [n for n in names if n not in arrays.ROUTING]
        if not self.cfg.extract.attention:
            names = [n for n in names if n not in ATTENTION_ARRAYS]
        return names + [sp.states for n, sp in arrays.SPANS.items() if layout.has_span(n) and sp.recorded_by(cond)]

    def shard_payload(self, ci, cond, shard, layout) -> ShardPayload:
        """One (condition, shard) unit: its buffers (:class:`~gapcache.extract.shardbuf.ShardBuffers`: the states'
        reused from the run's pool, copied into from the device), each planned sample's forward results in its
        row; failed samples keep the fill and their reason."""
        idx = list(layout.shard_samples(shard))
        sb = ShardBuffers(self.host_pool, self.unit_arrays(cond, layout), self.unit_sizes(layout), layout, idx,
                          self.cfg.model.dtype)
        buf = sb.values
        buf["status"][:] = STATUS_FAILED
        buf["error"][:] = [self.planned[i].failure for i in idx]
        todo = [j for j, i in enumerate(idx) if self.planned[i].ok]
        bs = self.cfg.extract.batch_size
        batches = [todo[b0 : b0 + bs] for b0 in range(0, len(todo), bs)]
        try:
            for rows, inputs in self.prefetched(batches, idx, cond):
                for j, res in zip(rows, self.forward_safe([idx[j] for j in rows], cond, inputs, sink=sb)):
                    if isinstance(res, SampleError):
                        buf["error"][j] = res.reason
                        continue
                    sb.put(j, res)
                    buf["status"][j] = STATUS_DONE
        finally:
            self.transfer.wait()  # every device copy into the buffers has landed (also before an error's cleanup)
        return sb.payload(ci, shard, buf["status"] == STATUS_DONE)

    @property
    def host_pool(self) -> HostPool:
        """The run's reusable shard-state buffers (page-locked on CUDA)."""
        if getattr(self, "_host_pool", None) is None:
            self._host_pool = HostPool(self.model.device)
        return self._host_pool

    def prefetched(self, batches, idx, cond):
        """Yield (rows, inputs) with the next batch's images and processor run in a thread,
        overlapping the current forward. A failed preparation yields its exception as inputs."""
        from concurrent.futures import ThreadPoolExecutor

        def prepare(rows):
            try:
                return self.batch_inputs([idx[j] for j in rows], cond)
            except Exception as err:  # handed to forward_safe, which retries one by one
                return err

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gapcache-prefetch") as pool:
            future = pool.submit(prepare, batches[0]) if batches else None
            for k, rows in enumerate(batches):
                inputs = future.result()
                if k + 1 < len(batches):
                    future = pool.submit(prepare, batches[k + 1])
                yield rows, inputs

    def forward_safe(self, indices, cond, inputs=None, sink=None):
        """Batched forward; if the batch fails, retry one by one so one bad sample fails alone."""
        try:
            if isinstance(inputs, Exception):
                raise inputs
            return self.forward(indices, cond, inputs, sink=sink)
        except SampleError:
            pass
        except (RuntimeError, ValueError) as err:
            if len(indices) == 1:
                return [SampleError(self.planned[indices[0]].sample.id, f"forward failed: {err}")]
            log.warning("batch of %d failed (%s); retrying one by one", len(indices), err)
        out = []
        for i in indices:
            try:
                out.extend(self.forward([i], cond, sink=sink))
            except SampleError as err:
                out.append(err)
            except (RuntimeError, ValueError) as err:
                out.append(SampleError(self.planned[i].sample.id, f"forward failed: {err}"))
        return out

    # ------------------------------------------------------------------ one batch
    def condition_image(self, i, cond):
        """The image ``cond`` feeds for planned sample i (the registry's ``image_kind``)."""
        p = self.planned[i]
        donor = None
        if cond.image_kind in NEEDS_DONOR:
            d = int(self.donor[i])
            if d < 0:
                raise SampleError(p.sample.id, f"no donor image for {cond.label} (fewer than 2 loadable images)")
            donor = self.planned[d].sample.load_image()
        return data_mod.feed_image(cond.image_kind, p.sample.load_image(), mean_rgb=self.mean_rgb, donor=donor)

    def batch_inputs(self, indices, cond, answers=None):
        """Processed batch with each row's gold answer (or ``answers[r]``, token ids) appended after its
        prompt (right padded); ``indices`` may repeat a sample (one row per candidate)."""
        P = [self.planned[i] for i in indices]
        answers = [p.answer_ids for p in P] if answers is None else answers
        images = [self.condition_image(i, cond) for i in indices]
        with self._processor_lock:  # generate() flips the padding side; the prefetch thread must not see it
            inputs = self.processor(text=[p.prompt for p in P], images=images, return_tensors="pt", padding=True)
        ids = inputs["input_ids"]  # (batch, seq)
        for r, p in enumerate(P):
            if ids[r, : len(p.prompt_ids)].tolist() != p.prompt_ids:
                raise SampleError(p.sample.id, f"token layout under {cond.label} differs from the planned prompt "
                                               "(the condition image changed the visual span)")
        total = max(len(p.prompt_ids) + len(a) for p, a in zip(P, answers))
        pad = self.processor.tokenizer.pad_token_id
        seq_keys = [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape[:2] == ids.shape]
        out = dict(inputs)
        for key in seq_keys:
            fill = pad if key == "input_ids" else 0
            new = torch.full((len(P), total), fill, dtype=inputs[key].dtype)
            for r, p in enumerate(P):
                n = len(p.prompt_ids)
                new[r, :n] = inputs[key][r, :n]
                if key in ("input_ids", "attention_mask"):
                    a = len(answers[r])
                    new[r, n : n + a] = torch.tensor(answers[r]) if key == "input_ids" else 1
            out[key] = new
        return out

    def site_indices(self, indices):
        P = [self.planned[i] for i in indices]
        text_rows = torch.tensor([r for r in range(len(P)) for _ in POSITION_SITES])
        text_pos = torch.tensor([pos for p in P for pos in position_row(p.sites)])
        vrows, vpos = [], []
        for r, (i, p) in enumerate(zip(indices, P)):
            sel = self.visual_select[i]
            flat = np.concatenate(sel) if isinstance(sel, list) else sel
            vrows += [r] * len(flat)
            vpos += (p.visual_start + flat).tolist()
        return (text_rows, text_pos), (torch.tensor(vrows, dtype=torch.long), torch.tensor(vpos, dtype=torch.long))

    def token_indices(self, indices):
        """(rows, positions) of the token span of a batch (every prompt text token), or None when not recorded."""
        if not self.text_tokens:
            return None
        rows, pos = [], []
        for r, i in enumerate(indices):
            t = self.token_positions(self.planned[i])
            rows += [r] * len(t)
            pos += t
        return torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)

    @torch.inference_mode()
    def forward(self, indices, cond, inputs=None, sink=None):
        """One batched forward of samples ``indices`` under ``cond``: per row, a dict of its unit arrays.

        The hidden states are gathered, subset or pooled on the model's device, and copied to the host once
        (:class:`~gapcache.extract.transfer.Transfer`: non-blocking into page-locked memory on CUDA). Without
        ``sink`` they land in fresh host memory and each row's dict holds them (the copies waited for); with a
        ``sink`` (:class:`~gapcache.extract.shardbuf.ShardBuffers`) they land in its rows and the dicts leave
        them out: the caller waits (``self.transfer.wait()``) before the shard is handed on."""
        self.ensure_fitted()
        P = [self.planned[i] for i in indices]
        # candidates the gold answer's forward cannot score: their own forwards first (before the main
        # forward, so that it is the last pass any hook of this batch sees)
        extra_rows = [(r, k) for r, p in enumerate(P) for k in p.cand_extra]
        extra_scores = self.candidate_logprobs([(indices[r], k) for r, k in extra_rows], cond) if extra_rows else []
        inputs = self.batch_inputs(indices, cond) if inputs is None else inputs
        text_idx, vis_idx = self.site_indices(indices)
        layers = self.adapter.decoder_layers(self.model)
        routing = self.routing(P, text_idx, inputs["input_ids"].shape[1])  # MoE routing (extract.routing)
        with Capture(layers, self.adapter.final_norm(self.model), self.record, self._stack_buffers) as capture, \
                self.intervention(P, cond, inputs, offsets=[0] * len(P)), \
                self.attention_summaries(P, inputs) as attention, routing:  # issue 14: None unless extract.attention
            capture.set_groups({"text": text_idx, "visual": vis_idx if cond.records_visual else None,
                                "token": self.token_indices(indices)})
            keep = sorted({p.prediction + t for p in P for t in range(len(p.answer_ids))})
            device = self.model.device
            model_inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            out = self.model(**model_inputs, use_cache=False, logits_to_keep=torch.tensor(keep, device=device))
            got = capture.stacked()  # on the device: text (batch*sites, layer, hidden), visual, token (n, ...)
            routes = routing.collect(len(SITES))  # per row: route_expert, route_weight, route_load ([] if off)
        states = self.states_to_host(indices, got, sink)  # copies queued; rows' host states (none with a sink)
        results = self.scores(P, keep, out.logits)
        attn_rows = attention.results() if attention is not None else None
        for r, res in enumerate(results):
            res.update(states[r])
            if attn_rows is not None:  # attention summaries (issue 14)
                res.update(attn_rows[r])
            res.update(routes[r] if routes else {})  # MoE routing
        for (r, j), score in zip(extra_rows, extra_scores):
            results[r]["candidate_logprob"][j] = score
        for res, p in zip(results, P):
            res["candidate_logprob"] = self.pooled(p, res["candidate_logprob"])
        if self.cfg.extract.generate.enabled:
            for res, text_out in zip(results, self.generate(indices, cond)):
                res["generation"] = text_out
        if sink is None:
            self.transfer.wait()  # the rows' states are read by the caller now
        return results

    def pooled(self, p, scores) -> np.ndarray:
        """(candidate,) float32: each of ``p``'s candidates scored by the logsumexp of its variants' exact
        log-probs ``scores`` (one per ``p.cand_seqs``; a single variant: its score as is); NaN elsewhere."""
        cand = np.full(len(self.candidates), np.nan, np.float32)
        for k, c in enumerate(p.cand_columns):
            own = [s for s, o in zip(scores, p.cand_owner) if o == k]
            cand[c] = own[0] if len(own) == 1 else logsumexp(own)
        return cand

    def scores(self, P, keep, logits) -> list[dict]:
        """Per row: the gold answer's teacher-forced log-prob and, per ``p.cand_seqs`` entry (candidate variant), its
        log-prob where the gold forward gives it (NaN: scored by the extra forward; :meth:`pooled` combines them).

        Only the log-probs used cross to the host: log_softmax over the vocabulary on the device, then one
        gather of the (row, kept position, token) entries; summed on the host in the order of the tokens."""
        logp = torch.log_softmax(logits.float(), dim=-1)  # (batch, len(keep), vocab), on the device
        col = {pos: c for c, pos in enumerate(keep)}
        where, gold_at, cand_at = [], [], []  # (row, column, token) entries; per row their index lists
        for r, p in enumerate(P):
            gold_at.append(range(len(where), len(where) + len(p.answer_ids)))
            where += [(r, col[p.prediction + t], tok) for t, tok in enumerate(p.answer_ids)]
            last = {}
            extra = set(p.cand_extra)
            for j, seq in enumerate(p.cand_seqs):  # every candidate variant's sequence
                if j not in extra:  # every factor read from the gold answer's forward
                    last[j] = (len(seq) - 1, len(where))
                    where.append((r, col[p.prediction + len(seq) - 1], seq[-1]))
            cand_at.append(last)
        at = torch.tensor(where, dtype=torch.long, device=logp.device).reshape(-1, 3)  # (entries, 3)
        vals = logp[at[:, 0], at[:, 1], at[:, 2]].cpu().numpy()  # (entries,) float32
        results = []
        for r, p in enumerate(P):
            gold_vals = [float(vals[e]) for e in gold_at[r]]
            scores = [np.nan] * len(p.cand_seqs)  # per variant sequence; the extra forward's filled in by forward
            for j, (head, e) in cand_at[r].items():
                scores[j] = sum(gold_vals[:head]) + float(vals[e])
            results.append({"gold_logprob": sum(gold_vals), "candidate_logprob": scores})
        return results

    def states_to_host(self, indices, got: dict, sink=None) -> list[dict]:
        """Queue the device -> host copies of a batch's states (visual pooled on the device first); per row,
        the host arrays of its states (empty dicts when they go to ``sink``'s rows)."""
        counts = {"text_states": [len(SITES)] * len(indices)}
        groups = {"text_states": got["text"]}  # (batch*sites, layer, hidden)
        if got.get("visual") is not None:
            groups["visual_states"], counts["visual_states"] = self.pool_visual(indices, got["visual"])
        if got.get("token") is not None:
            groups["token_states"] = got["token"]  # (n_text_tokens, layer, hidden)
            counts["token_states"] = [len(self.token_positions(self.planned[i])) for i in indices]
        t = self.transfer
        t.begin()
        out = [{} for _ in indices]
        for name, dev in groups.items():
            if sink is not None and name not in sink.tensors:  # a state array the store does not hold
                continue
            host = None if sink is not None else host_empty(dev.shape, dev.dtype, dev.device)
            if host is not None:
                t.copy(host, dev)
            bounds = np.cumsum([0] + counts[name])
            for r, (i, a, b) in enumerate(zip(indices, bounds[:-1], bounds[1:])):
                if sink is not None:
                    t.copy(sink.rows(name, i, b - a), dev[a:b])
                else:
                    out[r][name] = as_storage(host[a:b])
        t.end()
        return out

    def pool_visual(self, indices, vis: torch.Tensor):
        """The stored visual rows of a batch, on the device: the gathered rows as they are (mode all / subset)
        or each sample's contiguous groups averaged in float32 (mode pool). Returns (rows, per-row counts)."""
        sels = [self.visual_select[i] for i in indices]
        if not any(isinstance(sel, list) for sel in sels):
            return vis, [len(sel) for sel in sels]
        parts, counts, off = [], [], 0
        for sel in sels:  # pool: np.array_split groups, r of size q + 1 then k - r of size q
            n, k = sum(len(g) for g in sel), len(sel)
            chunk = vis[off : off + n]  # (n, layer, hidden)
            off += n
            q, r = divmod(n, k) if k else (0, 0)
            means = [chunk[: r * (q + 1)].reshape(r, q + 1, *chunk.shape[1:]).float().mean(1)] if r else []
            if k - r:
                means.append(chunk[r * (q + 1) :].reshape(k - r, q, *chunk.shape[1:]).float().mean(1))
            parts += [m.to(vis.dtype) for m in means]
            counts.append(k)
        return (torch.cat(parts) if parts else vis[:0]), counts

    @property
    def transfer(self) -> Transfer:
        """The run's device -> host copier (a side stream on CUDA), made for the model's device on first use."""
        if getattr(self, "_transfer", None) is None:
            self._transfer = Transfer(self.model.device)
        return self._transfer

    @torch.inference_mode()
    def candidate_logprobs(self, rows, cond) -> list[float]:
        """Exact log p(candidate) = sum_t log p(c_t | prompt, c_<t) for ``rows`` = [(sample index, j)]
        (j: index into the sample's ``cand_seqs``), by teacher-forced forwards of prompt + candidate
        rows under ``cond`` (its intervention hooks on), ``extract.batch_size`` rows at a time.

        Cost: one extra forward (vision tower included) per candidate that the gold answer's forward
        cannot score, i.e. none for single-token candidate sets."""
        out = []
        bs = self.cfg.extract.batch_size
        for b0 in range(0, len(rows), bs):
            chunk = rows[b0 : b0 + bs]
            indices = [i for i, _ in chunk]
            P = [self.planned[i] for i in indices]
            seqs = [P[r].cand_seqs[k] for r, (_, k) in enumerate(chunk)]
            inputs = self.batch_inputs(indices, cond, answers=seqs)
            keep = sorted({p.prediction + t for p, seq in zip(P, seqs) for t in range(len(seq))})
            device = self.model.device
            with self.intervention(P, cond, inputs, offsets=[0] * len(P)):
                model_inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                logits = self.model(**model_inputs, use_cache=False,
                                    logits_to_keep=torch.tensor(keep, device=device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            col = {pos: c for c, pos in enumerate(keep)}
            for r, (p, seq) in enumerate(zip(P, seqs)):
                out.append(sum(float(logp[r, col[p.prediction + t], tok]) for t, tok in enumerate(seq)))
        return out

    # ------------------------------------------------------------------ attention summaries (issue 14)
    def attention_summaries(self, P, inputs):
        """The attention summaries of this batch's forward (``extract.attention``), or nothing."""
        if not self.cfg.extract.attention:
            return contextlib.nullcontext()
        return AttentionSummaries(self.model, self.adapter, P, inputs["input_ids"].shape[1], self.record)

    def unit_sizes(self, layout) -> dict:
        """The layout's dimension sizes, and those of the attention summaries' own dimensions when on."""
        sizes = layout.sizes()
        if self.cfg.extract.attention:
            sizes.update({name: len(v) for name, v in self.attention_coords().items()})
        return sizes

    def attention_coords(self) -> dict:
        from gapcache.extract import attention as att

        strs = lambda xs: np.array(list(xs), dtype=object)  # noqa: E731
        heads = att.n_heads(att.text_config(self.adapter, self.model))
        return {"attn_query": strs(att.QUERIES), "attn_target": strs(att.TARGETS), "attn_stat": strs(att.STATS),
                "attn_head": np.arange(heads, dtype=np.int32)}

    def routing(self, P, text_idx, seq: int):
        """The MoE routing hooks of one batch (``extract.routing``), as a context manager; a no-op when off."""
        if not self.cfg.extract.routing:
            return routing_mod.NoRouting()
        r = routing_mod.Routing(self.adapter, self.model)
        r.set_batch(text_idx, routing_mod.modality_map(
            [(len(p.prompt_ids), p.visual_start, p.visual_length) for p in P], seq))
        return r

    def to_storage(self, t: torch.Tensor) -> np.ndarray:
        return as_storage(t.contiguous())

    def intervention(self, P, cond, inputs, offsets):
        """The hooks of ``cond`` (its registry ``Hook``: strategy, layers, positions) for this batch, as a
        context manager that removes them on exit; installs nothing for a condition without a hook. Row r's
        prompt starts at ``offsets[r]`` (0 right padded; left padded: the padding before it)."""
        hook = cond.hook(self.n_layers)
        extra = {}
        if hook is not None and strategy_entry(hook.strategy).donor:
            extra["donor_states"] = self.donor_states([p.index for p in P], hook.layers[0], left=any(offsets))
        return interventions.install(self.adapter.decoder_layers(self.model), hook, P, offsets,
                                     inputs, fitted=self.fitted, seed=self.cfg.extract.soft_seed, **extra)

    @torch.inference_mode()
    def donor_states(self, indices, layer: int, left: bool = False) -> list:
        """Per row: the visual states (n_vis, hidden) entering decoder ``layer`` in a forward of the row's prompt
        with its donor's image resized to its own size (the blind-image kind's input), stopped there: the vision
        tower and layers 0..layer-1, one partial forward per batch. ``left``: left padded, as generation is.
        The last few batches are cached (a swap condition's candidate, gold and generation forwards share one)."""
        key = (tuple(indices), layer, left)
        cache = self.__dict__.setdefault("_donor_cache", {})
        if key in cache:
            return cache[key]
        donor_cond = Condition(next(n for n, k in KINDS.items() if k.image in NEEDS_DONOR))
        P = [self.planned[i] for i in indices]
        if left:
            inputs, offsets = self.left_padded_inputs(indices, donor_cond)
        else:
            inputs, offsets = self.batch_inputs(indices, donor_cond), [0] * len(P)
        where = interventions.positions(P, "visual", offsets, inputs)
        got = {}

        def stop(module, args, kwargs):
            h = hidden_of(args, kwargs)
            rows, pos = where.index
            got["h"] = h[rows.to(h.device), pos.to(h.device)].detach()  # (n_vis over rows, hidden)
            raise StopForward

        handle = self.adapter.decoder_layers(self.model)[layer].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(**{k: v.to(self.model.device) if torch.is_tensor(v) else v for k, v in inputs.items()},
                       use_cache=False, logits_to_keep=1)
        except StopForward:
            pass
        finally:
            handle.remove()
        out = [got["h"][a:b] for a, b in where.spans]
        if len(cache) >= 4:
            cache.pop(next(iter(cache)))
        cache[key] = out
        return out

    @torch.inference_mode()
    def generate(self, indices, cond) -> list[str]:
        """Greedy generation from the prompt (left padded), decoded without special tokens, stored raw
        (not stripped: a whitespace-only generation stays distinguishable from an empty one; scoring strips)."""
        new = self.generate_ids(indices, cond)
        return list(self.processor.tokenizer.batch_decode(new, skip_special_tokens=True))

    def left_padded_inputs(self, indices, cond):
        """The processed prompts of ``indices`` under ``cond``, left padded (as generation needs), and each row's
        offset (the padding before its prompt)."""
        tok = self.processor.tokenizer
        P = [self.planned[i] for i in indices]
        images = [self.condition_image(i, cond) for i in indices]
        with self._processor_lock:
            tok.padding_side = "left"
            try:
                inputs = self.processor(text=[p.prompt for p in P], images=images, return_tensors="pt", padding=True)
            finally:
                tok.padding_side = "right"
        seq = inputs["input_ids"].shape[1]
        offsets = [seq - len(p.prompt_ids) for p in P]
        for r, (o, p) in enumerate(zip(offsets, P)):
            if inputs["input_ids"][r, o:].tolist() != p.prompt_ids:
                raise SampleError(p.sample.id, f"left-padded prompt under {cond.label} differs from the planned one")
        return inputs, offsets

    @torch.inference_mode()
    def generate_ids(self, indices, cond) -> torch.Tensor:
        """(batch, new tokens) greedy continuation of each prompt under ``cond``; an intervention keeps
        its hooks on for every decoding step (zero: the cached visual K/V were computed from zeroed
        states; drop: the generated tokens see no visual key at layers > L)."""
        self.ensure_fitted()
        tok = self.processor.tokenizer
        P = [self.planned[i] for i in indices]
        inputs, offsets = self.left_padded_inputs(indices, cond)
        seq = inputs["input_ids"].shape[1]
        with self.intervention(P, cond, inputs, offsets):
            model_inputs = {k: v.to(self.model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            out = self.model.generate(**model_inputs, do_sample=False, pad_token_id=tok.pad_token_id,
                                      max_new_tokens=self.cfg.extract.generate.max_new_tokens)
        return out[:, seq:].cpu()


class FitSums:
    """Float64 sums of states per layer (one position group of the fit pre-pass): count, sum, sum of squares
    and (``outer``) the outer-product sum, from which the mean, the entry std and the PCA follow."""

    def __init__(self, outer: bool):
        self.outer, self.n, self.sum, self.sq, self.xtx = outer, {}, {}, {}, {}

    def add(self, layer: int, x: torch.Tensor):  # x: (n, hidden) float64
        self.n[layer] = self.n.get(layer, 0) + x.shape[0]
        self.sum[layer] = self.sum.get(layer, 0) + x.sum(0)
        self.sq[layer] = self.sq.get(layer, 0) + (x * x).sum()
        if self.outer:
            self.xtx[layer] = self.xtx.get(layer, 0) + x.T @ x

    def means(self, layers) -> np.ndarray:  # (layer, hidden) float32
        return np.stack([(self.sum[l] / self.n[l]).float().cpu().numpy() for l in layers])

    def sigmas(self, layers) -> np.ndarray:
        """(layer,) float32: sqrt(sum x^2 / N - (sum x / N)^2) over the N = tokens x hidden entries."""
        out = []
        for l in layers:
            entries = self.n[l] * self.sum[l].numel()
            out.append(float((self.sq[l] / entries - (self.sum[l].sum() / entries) ** 2).clamp_min(0).sqrt()))
        return np.array(out, np.float32)

    def pca(self, layers, k: int):
        """(layer, k, hidden) bases (rows signed so their largest-magnitude entry is positive), (layer, k) variances."""
        bases, variances = [], []
        for l in layers:
            mu = self.sum[l] / self.n[l]
            cov = self.xtx[l] / self.n[l] - torch.outer(mu, mu)
            k = min(k, int(mu.numel()))
            evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)  # ascending
            evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k].T  # (k,), (k, hidden)
            top = evecs.abs().argmax(dim=1)
            evecs = evecs * torch.sign(evecs[torch.arange(k), top])[:, None]
            bases.append(evecs.float().cpu().numpy())
            variances.append(evals.clamp_min(0).float().cpu().numpy())
        return np.stack(bases), np.stack(variances)
