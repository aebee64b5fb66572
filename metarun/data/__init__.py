"""Datasets (class pools) and the episode sampler. Mirrors ``configs/dataset``."""
