"""gapcache.slurm"""
