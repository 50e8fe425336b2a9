"""gapcache: activation-cache-first interpretability for vision-language models.

Tiers: ``gapcache.extract`` (GPU, needs the ``extract`` extra), ``gapcache.store`` (the Zarr
contract) and ``gapcache.analyze`` (CPU, lazy with Dask). ``store`` and ``analyze`` never
import torch.
"""

from gapcache._version import __version__

__all__ = ["__version__"]
