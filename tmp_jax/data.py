"""``tmp_jax.data`` is :mod:`tmp_jax.fmnist` (the Fashion-MNIST data) under its old name.

The module was renamed to say what it is; this makes the old import path the SAME module object (not a copy), so
``tmp_jax.data.X`` and ``tmp_jax.fmnist.X`` are one thing, monkeypatches included.
"""

import sys

from tmp_jax import fmnist

sys.modules[__name__] = fmnist
