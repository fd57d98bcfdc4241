"""Root conftest: doctests in jaxbn/ also run on 8 simulated CPU devices; hypothesis is derandomized.

hypothesis: the ``jaxbn`` profile (loaded by default) draws the same examples on every run
(``derandomize=True``: the seed comes from each test's source) and keeps no example database,
so a CI result depends on the code only, not on which machine ran it before or on luck.
``HYPOTHESIS_PROFILE=explore`` draws fresh random examples (for local bug hunting).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from hypothesis import settings  # noqa: E402

settings.register_profile("jaxbn", derandomize=True, database=None, deadline=None,
                          print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, deadline=None,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jaxbn"))
