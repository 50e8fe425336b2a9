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
