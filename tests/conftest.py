import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _gapcache_cache(tmp_path_factory):
    """Builtin models are built into a per-session cache, never the user's home."""
    if "GAPCACHE_CACHE" not in os.environ:
        os.environ["GAPCACHE_CACHE"] = str(tmp_path_factory.mktemp("gapcache_cache"))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op torch thread is ~5x faster than two fighting over 2 shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
