"""metarun: a config-driven experiment runner for meta-learning.

``import metarun`` stays light: torch, TensorBoard and the data loaders are imported
by the modules that use them (``metarun.runner``, ``metarun.data``, ...).
"""

__version__ = "0.1.0"
