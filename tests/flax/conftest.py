"""Flax tests run on the CPU (JAX_PLATFORMS=cpu), with small models, in their own process (make test)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
