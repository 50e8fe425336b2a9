"""gapcache.slurm: a config -> an extraction job array (GPU) + an analysis job chained after it (CPU).

``gapcache slurm plan|submit|status``; see ``gapcache.slurm.plan`` for the run directory layout,
the array sizing, requeue on preemption, and ``gapcache.slurm.cli`` for the commands.
"""
