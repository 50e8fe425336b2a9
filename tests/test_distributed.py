"""Where the analysis graph runs does not change its numbers: the same store analysed on dask's local threads and
on a two-process ``distributed.LocalCluster`` gives identical summaries (every estimate, CI and array equal).
The same check on real Slurm workers (dask-jobqueue) is in tests/test_slurm.py."""

import json

import pytest
import xarray as xr

from gapcache.analyze.pipeline import AnalysisParams, run_analysis
from gapcache.cli import main
from helpers import comparable_summary
from test_extract_run import write_config

pytestmark = pytest.mark.integration


def analysis_store(tmp):
    """A real store (tiny LLaVA): original, blind_black and zero-truncation at five layers, 24 samples."""
    cfg = write_config(tmp, conditions=["original", "blind_black", "truncated"], truncation_layers=[-1, 0, 1, 2, 3],
                       truncation_strategies=["zero"])
    assert main(["extract", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "store.zarr"


def analyse(store, out, scheduler):
    """(summary.json as written, the results Dataset) of every registered metric on ``scheduler``."""
    run_analysis([store], out, AnalysisParams(n_resamples=199, n_splits=2, scheduler=scheduler))
    return json.loads((out / "summary.json").read_text()), xr.open_zarr(out / "results_store.zarr").load()


@pytest.mark.slow
def test_threads_and_a_two_process_local_cluster_give_identical_summaries(tmp_path):
    distributed = pytest.importorskip("distributed")
    store = analysis_store(tmp_path)
    ref, ref_arrays = analyse(store, tmp_path / "threads", "threads")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        got, got_arrays = analyse(store, tmp_path / "cluster", cluster.scheduler_address)
        with distributed.Client(cluster) as client:  # the work ran on the two worker processes
            assert len(client.scheduler_info()["workers"]) == 2
    metrics = ref["stores"]["store"]["metrics"]
    assert {"evd", "rank", "probes", "accuracy"} <= set(metrics) and "skipped" not in metrics["probes"]
    assert comparable_summary(got) == comparable_summary(ref)
    xr.testing.assert_identical(got_arrays, ref_arrays)
