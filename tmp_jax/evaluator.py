"""``tmp_jax.evaluator`` is :mod:`tmp_jax.fmnist_classifier` (the Fashion-MNIST evaluator CNN) under its old name.

The module was renamed to say what it is; this makes the old import path the SAME module object (not a copy), so
``tmp_jax.evaluator.X`` and ``tmp_jax.fmnist_classifier.X`` are one thing, monkeypatches included.
"""

import sys

from tmp_jax import fmnist_classifier

sys.modules[__name__] = fmnist_classifier
