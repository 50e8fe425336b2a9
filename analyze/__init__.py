"""gapcache.analyze: the CPU tier (metrics, CIs, figures, report) from a store alone. No torch.

Importing it registers the built-in metrics (:mod:`gapcache.analyze.pipeline` declares them in
:mod:`gapcache.analyze.metrics`), so the registry is complete whichever module is imported first.
"""

from gapcache.analyze import pipeline as _pipeline  # noqa: F401  (registers the built-in metrics)
