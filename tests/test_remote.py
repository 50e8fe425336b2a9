"""Stores opened read-only over HTTP (local http.server) and S3 (moto's server), without copying."""

import functools
import http.server
import io
import os
import threading

import numpy as np
import pytest

from gapcache.store import info, open_store
from gapcache.store.verify import freeze, unfreeze_permissions, verify
from helpers import free_ports, random_payloads, roundtrip, small_layout


@pytest.fixture
def store(tmp_path):
    layout = small_layout("bfloat16")
    roundtrip(tmp_path / "run" / "store.zarr", layout, random_payloads(layout))
    return tmp_path / "run" / "store.zarr"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    """http.server plus byte ranges (zarr reads a shard's index as a suffix range, as from nginx or S3)."""

    def log_message(self, *a):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not rng.startswith("bytes=") or not os.path.isfile(path):
            return super().send_head()
        data = open(path, "rb").read()
        lo, hi = rng[6:].split(",")[0].split("-")
        if lo == "":
            start, end = max(0, len(data) - int(hi)), len(data)
        else:
            start, end = int(lo), (int(hi) + 1 if hi else len(data))
        end = min(end, len(data))
        body = data[start:end]
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@pytest.fixture
def http_root(store):
    pytest.importorskip("aiohttp")
    handler = functools.partial(_Quiet, directory=str(store.parent))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_open_over_http_equals_local(store, http_root):
    freeze(store)  # consolidated metadata: HTTP has no directory listing
    try:
        url = f"{http_root}/store.zarr"
        remote, local = open_store(url), open_store(store)
        for name in ("text_states", "visual_states", "gold_logprob", "status"):
            np.testing.assert_array_equal(remote[name].values, local[name].values)
        d = info(url)
        assert d["complete"] and d["path"] == url
        rep = verify(url)
        assert rep.ok, rep.problems
    finally:
        unfreeze_permissions(store)


def test_http_verify_finds_corruption(store, http_root):
    f = store / "text_states" / "c" / "0" / "0" / "0" / "0" / "0"
    b = bytearray(f.read_bytes())
    b[5] ^= 0xFF
    f.write_bytes(bytes(b))
    assert any("checksum mismatch" in p for p in verify(f"{http_root}/store.zarr").problems)


def test_remote_store_is_read_only(store, http_root):
    from gapcache.store.remote import fsspec_store

    st = fsspec_store(f"{http_root}/store.zarr")
    assert st.read_only
    import zarr

    g = zarr.open_group(st, mode="r")
    with pytest.raises(Exception):
        g["status"][0, 0] = 5


@pytest.fixture
def s3(store):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    port, = free_ports(1)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"}}
    import s3fs

    import boto3

    boto3.client("s3", endpoint_url=opts["endpoint_url"], aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="bucket")
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(store), "bucket/run/store.zarr", recursive=True)
    yield "s3://bucket/run/store.zarr", opts
    server.stop()


def test_open_over_s3_equals_local_and_runs_analysis(store, s3):
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store

    url, opts = s3
    remote, local = open_store(url, storage_options=opts), open_store(store)
    for name in ("text_states", "visual_states", "candidate_logprob"):
        np.testing.assert_array_equal(remote[name].values, local[name].values)
    assert verify(url, opts).ok
    assert info(url, opts)["size_bytes"] > 0
    summary, _ = analyze_store(remote, AnalysisParams(metrics=("rank",), cliff_layer=1, n_resamples=20))
    assert "rank" in summary["metrics"]
