"""Root conftest: doctests in jaxbn/ also run on 8 simulated CPU devices."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
