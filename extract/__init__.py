"""gapcache.extract"""
