"""The writer at disk speed (issue 15, target 2): store settings against a raw fsync'd write of the same bytes.

Usage::

    python benchmarks/bench_writer.py                        # default variants, 3 rounds, in a temp dir
    python benchmarks/bench_writer.py --io-variants default,zstd:1,none --io-repeats 5 --workdir /scratch/$USER

No model. Shard payloads shaped like Qwen3-VL-30B-A3B with a visual budget (hidden 2048, 49 recorded
layers, 64 visual tokens per sample, 32 samples per shard: ~424 MB a shard) of bf16 bits go through
``StoreWriter``, timed from the first ``submit`` to ``close()`` plus an fsync of every file and
``os.sync()``. The reference is a raw sequential write of the same bytes (64 MiB ``os.write``
blocks, ``fsync``, ``os.sync``) in the same directory, run right before every writer run: each
writer run's ratio is to its own raw run (the disk drifts; other processes load it), and the
figure is the median of those ratios. Every round runs every variant once, in order.

Variants: a compression setting of ``gapcache.store.codec.parse_compression`` (``none``,
``zstd:1``, ``blosc:lz4:5:bitshuffle``, ...) or ``default`` (whatever the store's default is),
optionally ``+buffered`` (shard files through the page cache: ``StoreWriter(direct_io=False)``).
Printed per variant: payload MB/s, ratio to raw, bytes on disk per value (what the run adds
to the store: shard files with their indexes, the score arrays, the checksum records), and the process CPU seconds
(user + system, all threads) per run.

Also printed, for the record: the same raw write with ``O_DIRECT`` (8 MiB page-aligned blocks,
past the page cache; what the disk takes when the kernel's page-cache copy is not in the way),
once per round, not the reference of the target.

Payload data (``--io-data``): ``normal`` (bf16 of float32 normal * 2, as in ``bench_extract.py``)
or ``resid`` (residual-stream-like: Student-t(5) values scaled per hidden channel by a lognormal
factor, so channels differ in range as real hidden states do). One pool of 2**25 values; each
shard is the pool rotated by a shard-specific offset and tiled, so no two inner chunks repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1e6
DEFAULT_VARIANTS = "default,zstd:1+buffered,blosc:lz4:9:bitshuffle:32768,blosc:zstd:1:shuffle:262144,none"


def _sync_tree(path: Path):
    """fsync every file under path (and the directories), then os.sync()."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.sync()


def _tree_bytes(path: Path) -> int:
    return sum(os.stat(os.path.join(root, n)).st_size for root, _d, files in os.walk(path) for n in files)


def _pool(kind: str, rng) -> np.ndarray:
    """2**25 bf16 values (uint16 bits) of the payload distribution."""
    from gapcache.store import codec

    n = 1 << 25
    if kind == "normal":
        return codec.encode_bf16(rng.standard_normal(n, dtype=np.float32) * 2.0)
    if kind == "resid":
        scale = np.exp(rng.normal(0.0, 1.0, 2048)).astype(np.float32)  # (hidden,) per-channel range
        t = rng.standard_t(5, size=(n // 2048, 2048)).astype(np.float32)  # (rows, hidden)
        return codec.encode_bf16((t * scale).reshape(-1))
    raise SystemExit(f"--io-data must be 'normal' or 'resid'. Got {kind!r} instead.")


def payloads(args):
    """(ShardPayloads of condition 0, number of shards) totalling about ``args.io_mb`` MB of states."""
    from gapcache.store import ShardPayload

    spc, nl, h, v = args.io_samples_per_shard, args.io_layers, args.io_hidden, args.io_vtokens
    shard_values = spc * (2 * nl * h + v * nl * h)
    n_shards = max(1, round(args.io_mb * MB / (2 * shard_values)))
    rng = np.random.default_rng(args.seed)
    pool = _pool(getattr(args, "io_data", "normal"), rng)

    def take(shape, offset):
        return np.resize(np.roll(pool, -(offset % pool.size)), int(np.prod(shape))).reshape(shape)

    pays = []
    for s in range(n_shards):
        pays.append(ShardPayload(0, s, dict(
            text_states=take((spc, 2, nl, h), 7919 * s + 1),  # (sample, site, layer, hidden)
            visual_states=take((spc * v, nl, h), 1_000_003 * s + 13),  # (vtoken, layer, hidden)
            gold_logprob=rng.standard_normal(spc).astype(np.float32),
            candidate_logprob=rng.standard_normal((spc, 2)).astype(np.float32),
            status=np.ones(spc, np.uint8), error=np.array([""] * spc, dtype=object),
        )))
    return pays, n_shards


def raw_write(pays, directory: Path, block: int) -> float:
    """Seconds to write the states' bytes sequentially (``block``-byte os.write), fsync, os.sync."""
    path = directory / "raw.bin"
    os.sync()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for p in pays:
            for a in (p.text_states, p.visual_states):
                mv = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
                for i in range(0, len(mv), block):
                    chunk = mv[i: i + block]
                    while len(chunk):
                        chunk = chunk[os.write(fd, chunk):]
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(directory, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    os.sync()
    dt = time.perf_counter() - t0
    path.unlink()
    os.sync()
    return dt


def raw_direct_write(pays, directory: Path, block: int = 8 << 20) -> float | None:
    """Seconds of the same raw write with O_DIRECT (page-aligned ``block`` buffer); None where refused."""
    import mmap

    path = directory / "raw_direct.bin"
    buf = mmap.mmap(-1, block)
    view = memoryview(buf)
    os.sync()
    t0 = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return None
    fill = total = 0
    try:
        for p in pays:
            for a in (p.text_states, p.visual_states):
                mv = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
                while mv.nbytes:
                    n = min(mv.nbytes, block - fill)
                    view[fill: fill + n] = mv[:n]
                    fill, mv, total = fill + n, mv[n:], total + n
                    if fill == block:
                        os.write(fd, view)
                        fill = 0
        if fill:
            os.write(fd, view[: -(-fill // 4096) * 4096])
            os.ftruncate(fd, total)
        os.fsync(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
        view.release()
        buf.close()
    os.sync()
    dt = time.perf_counter() - t0
    path.unlink()
    os.sync()
    return dt


def store_write(pays, n_shards, args, directory: Path, variant: str) -> dict:
    """One writer run of ``variant`` into a fresh store: seconds, CPU seconds, bytes on disk."""
    import zarr

    from gapcache.conditions import Condition
    from gapcache.store import Layout, StoreWriter, create

    spc = args.io_samples_per_shard
    n = n_shards * spc
    setting, _, how = variant.partition("+")
    if how not in ("", "buffered"):
        raise SystemExit(f"A variant is a compression setting or 'default', optionally '+buffered'. Got {variant!r}.")
    extra = {} if setting == "default" else {"compression": setting}
    layout = Layout(
        sample_ids=tuple(f"s{i:06d}" for i in range(n)), conditions=(Condition("original"),),
        layers=tuple(range(args.io_layers)), hidden=args.io_hidden, model_dtype="bfloat16",
        candidates=("yes", "no"), visual_lengths=(args.io_vtokens,) * n, samples_per_shard=spc,
        visual_chunk_tokens=64, **extra,
    )
    path = directory / "store.zarr"
    create(path, layout, {"bench": True}, {"label": np.zeros(n, np.int32)})
    os.sync()
    meta_bytes = _tree_bytes(path)
    c0 = os.times()
    t0 = time.perf_counter()
    with StoreWriter(path, threads=getattr(args, "io_threads", 0) or None, direct_io=how != "buffered") as writer:
        for p in pays:
            writer.submit(p)
    t_close = time.perf_counter()
    _sync_tree(path)
    dt = time.perf_counter() - t0
    c1 = os.times()
    values = sum(p.text_states.size + p.visual_states.size for p in pays)
    stored = _tree_bytes(path) - meta_bytes
    inner = zarr.open_group(str(path), mode="r")["visual_states"].metadata.to_dict()["codecs"][0]
    codecs = [c["name"] for c in inner["configuration"]["codecs"]]
    shutil.rmtree(path)
    os.sync()
    return {"seconds": dt, "write_s": t_close - t0, "sync_s": dt - (t_close - t0),
            "cpu_s": (c1.user - c0.user) + (c1.system - c0.system), "user_s": c1.user - c0.user,
            "sys_s": c1.system - c0.system, "stored_bytes": stored, "values": values,
            "bytes_per_value": stored / values, "codecs": codecs, "compression": str(layout.state_compression)}


def bench_io(args, work: Path) -> dict:
    """Every variant, ``args.io_repeats`` rounds, each run after its own raw write."""
    directory = work / "io"
    directory.mkdir(parents=True, exist_ok=True)
    pays, n_shards = payloads(args)
    nbytes = sum(p.text_states.nbytes + p.visual_states.nbytes for p in pays)
    block = int(args.block_mb * (1 << 20))
    variants = args.io_variants.split(",")
    raws, directs, runs = [], [], {v: [] for v in variants}
    loads = [os.getloadavg()]
    for _ in range(args.io_repeats):
        directs.append(raw_direct_write(pays, directory))
        for variant in variants:
            raw = raw_write(pays, directory, block)
            raws.append(raw)
            r = store_write(pays, n_shards, args, directory, variant)
            r["raw_s"], r["loadavg"] = raw, os.getloadavg()
            runs[variant].append(r)
        loads.append(os.getloadavg())
    out = {}
    for variant, rs in runs.items():
        mb_s = [nbytes / r["seconds"] / MB for r in rs]
        ratios = [r["raw_s"] / r["seconds"] for r in rs]
        out[variant] = {"compression": rs[0]["compression"], "codecs": rs[0]["codecs"],
                        "mb_s": statistics.median(mb_s), "mb_s_all": [round(x, 1) for x in mb_s],
                        "ratio": statistics.median(ratios), "ratio_all": [round(x, 3) for x in ratios],
                        "bytes_per_value": statistics.median(r["bytes_per_value"] for r in rs),
                        "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                        "cpu_s_per_gb": statistics.median(r["cpu_s"] for r in rs) / (nbytes / 1e9),
                        "runs": rs}
    raw_mb_s = [nbytes / s / MB for s in raws]
    direct_mb_s = [nbytes / s / MB for s in directs if s]
    return {
        "config": {"hidden": args.io_hidden, "layers": args.io_layers, "visual_tokens_per_sample": args.io_vtokens,
                   "samples_per_shard": args.io_samples_per_shard, "shards": n_shards, "data": args.io_data,
                   "payload_bytes": nbytes, "raw_block_bytes": block, "repeats": args.io_repeats,
                   "directory": str(directory), "cpus": len(os.sched_getaffinity(0))},
        "loadavg": loads,
        "raw_mb_s": statistics.median(raw_mb_s), "raw_mb_s_all": [round(x, 1) for x in raw_mb_s],
        "raw_direct_mb_s": statistics.median(direct_mb_s) if direct_mb_s else None,
        "raw_direct_mb_s_all": [round(x, 1) for x in direct_mb_s],
        "variants": out, "target_ratio": 0.9, "target_bytes_per_value": 1.7,
    }


def print_io(io: dict) -> None:
    ic = io["config"]
    out = [f"\n== I/O-bound: hidden {ic['hidden']}, {ic['layers']} layers, {ic['visual_tokens_per_sample']} vis "
           f"tokens/sample, {ic['samples_per_shard']} samples/shard, {ic['shards']} shards = "
           f"{ic['payload_bytes'] / MB:.0f} MB of bf16 ({ic['data']}), {ic['repeats']} rounds, {ic['cpus']} CPUs, "
           f"in {ic['directory']}",
           f"  raw sequential write (os.write {ic['raw_block_bytes'] >> 20} MiB + fsync): "
           f"{io['raw_mb_s']:.0f} MB/s median of {io['raw_mb_s_all']}  (the reference)",
           "  raw write with O_DIRECT (8 MiB aligned + fsync): " + (
               f"{io['raw_direct_mb_s']:.0f} MB/s median of {io['raw_direct_mb_s_all']}  (for the record)"
               if io["raw_direct_mb_s"] else "refused by this filesystem"),
           f"  {'variant':<28s} {'MB/s':>6s} {'ratio':>6s} {'B/value':>8s} {'CPU s':>6s} {'CPU s/GB':>8s}  "
           "ratio to own raw run, each round"]
    for name, v in io["variants"].items():
        ok = "PASS" if v["ratio"] >= io["target_ratio"] else "MISS"
        bok = "PASS" if v["bytes_per_value"] <= io["target_bytes_per_value"] else "MISS"
        label = name if name != "default" else f"default ({v['compression']})"
        out.append(f"  {label:<28s} {v['mb_s']:6.0f} {v['ratio']:6.3f} {v['bytes_per_value']:8.4f} {v['cpu_s']:6.2f} "
                   f"{v['cpu_s_per_gb']:8.2f}  {v['ratio_all']}  ratio {ok}, bytes {bok}")
    out.append(f"  load average (1, 5, 15 min) before and after each round: "
               f"{[tuple(round(x, 2) for x in la) for la in io['loadavg']]}")
    print("\n".join(out))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("I/O-bound")
    g.add_argument("--io-mb", type=float, default=1536, help="payload size to push through the writer (MB)")
    g.add_argument("--io-hidden", type=int, default=2048)
    g.add_argument("--io-layers", type=int, default=49)
    g.add_argument("--io-vtokens", type=int, default=64)
    g.add_argument("--io-samples-per-shard", type=int, default=32)
    g.add_argument("--io-data", default="normal", choices=["normal", "resid"])
    g.add_argument("--io-variants", default=DEFAULT_VARIANTS,
                   help="comma list of 'default' and compression settings (codec.parse_compression)")
    g.add_argument("--io-repeats", type=int, default=3, help="rounds; each runs every variant once")
    g.add_argument("--block-mb", type=float, default=64, help="raw write block (MiB)")
    g.add_argument("--io-threads", type=int, default=0, help="StoreWriter encode threads (0: its default)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a new temp dir, removed after)")
    ap.add_argument("--seed", type=int, default=0)
    add_arguments(ap)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gapcache-bench-writer-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = bench_io(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_io(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return res


if __name__ == "__main__":
    main()
