"""gapcache.analyze"""
