"""Lifelong (continual) learning: task streams, methods, the accuracy matrix and its metrics.

``scenario=`` picks a stream (:mod:`metarun.continual.scenarios`), ``algo=`` a method that
learns it (:mod:`metarun.continual.methods`); the continual recipe
(:mod:`metarun.recipes.continual`) trains on the tasks in order and fills the accuracy
matrix (:mod:`metarun.continual.metrics`). Nothing heavy is imported here.
"""
