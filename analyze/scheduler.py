"""Where the analysis graph runs: ``--scheduler threads|processes|ADDRESS|slurm``.

Usage::

    with scheduler("threads"):            # dask's local threads (default)
        value.compute()
    with scheduler("tcp://10.0.0.5:8786"):  # an existing dask.distributed scheduler
        ...
    with scheduler("slurm", slurm=cfg.slurm):  # workers started by dask-jobqueue, closed at the end
        ...
"""

from __future__ import annotations

import contextlib

from gapcache.errors import ConfigError

LOCAL = ("threads", "processes", "synchronous")


@contextlib.contextmanager
def scheduler(name: str = "threads", slurm=None, n_workers: int = 2):
    """Context in which ``.compute()`` runs on the chosen scheduler; cluster resources are released."""
    import dask

    if name in LOCAL:
        with dask.config.set(scheduler=name):
            yield None
        return
    if name == "slurm":
        with _slurm_client(slurm, n_workers) as client:
            yield client
        return
    if "://" in name or name.count(":") == 1:
        from distributed import Client

        with Client(name) as client:
            yield client
        return
    raise ConfigError(
        f"The 'scheduler' parameter must be one of {list(LOCAL) + ['slurm']} or a dask scheduler address "
        f"like tcp://host:8786. Got {name!r} instead."
    )


@contextlib.contextmanager
def _slurm_client(slurm, n_workers: int):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("--scheduler slurm needs dask-jobqueue: pip install 'gapcache[slurm]'.") from None
    from distributed import Client

    if slurm is None:
        raise ConfigError("--scheduler slurm needs the config's 'slurm' section (partition, memory, time).")
    cluster = slurm_cluster(slurm, SLURMCluster)
    try:
        cluster.scale(jobs=n_workers)
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def slurm_cluster(slurm, cls):
    """A dask-jobqueue ``cls`` (SLURMCluster) sized by the config's CPU-tier fields: each worker job asks for
    ``analysis_cpus`` cores, ``analysis_mem`` and ``analysis_time`` on ``analysis_partition`` (never the GPU
    array's ``cpus_per_task`` / ``mem``), and runs one worker process with ``analysis_cpus`` threads (the
    metrics are numpy/scipy calls that release the GIL; one process keeps the whole memory for one chunk)."""
    return cls(
        queue=slurm.analysis_partition, account=slurm.account, cores=slurm.analysis_cpus, processes=1,
        memory=slurm.analysis_mem, walltime=slurm.analysis_time, job_script_prologue=list(slurm.setup),
    )
