"""Communication that does not grow with the number of devices (compiled HLO, compile only).

One synced BN layer (C = 256 features, float32) is compiled under ``jax.shard_map`` on 8, 64
and 256 simulated CPU devices (a fresh process per device count: JAX fixes it at start-up).
Per BN call, in every variance mode, with and without a mask:

* forward: TWO all-reduces — the common shift, ``(1 + masked) × C × 4`` bytes (it depends on
  a small sample of ``x`` only, so it overlaps the pass over ``x``), then
  ``(Σ(x−K), Σ(x−K)²[, count])``, ``(2 + masked) × C × 4`` bytes;
* backward: ONE all-reduce of ``(Σdy, Σdy·x̂)``, ``2 × C × 4`` bytes;
* no conditional, so nothing inside a branch;

the same numbers at every device count. jaxbn 0.1's stable mode all-reduced a
``devices × 3 × C`` buffer (26 KB at 8 devices, 788 KB at 256): that would fail here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

C = 256
F32 = 4

_WORKER = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxbn
    from jaxbn import testing
    C = int(sys.argv[1])
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    b = P("data")
    n = 2 * len(jax.devices())
    sds = lambda shape, dt, spec: jax.ShapeDtypeStruct(shape, dt,
                                                       sharding=NamedSharding(mesh, spec))
    out = {}
    for fast in (False, True):
      for masked in (False, True):
        def fwd(x, m, s, bias):
          return jaxbn.batch_norm(x, jaxbn.init_stats(C), s, bias, training=True,
                                  axis_name="data", mask=m if masked else None,
                                  use_fast_variance=fast)[0]
        def fwd_bwd(x, m, s, bias, w):
          return jax.grad(lambda x, s, bias: jnp.sum(fwd(x, m, s, bias) * w),
                          argnums=(0, 1, 2))(x, s, bias)
        args = [sds((n, C), jnp.float32, b), sds((n, 1), jnp.bool_, b),
                sds((C,), jnp.float32, P()), sds((C,), jnp.float32, P())]
        specs = [b, b, P(), P()]
        for name, f, extra, outs in (("fwd", fwd, [], b),
                                     ("fwd_bwd", fwd_bwd, [sds((n, C), jnp.float32, b)],
                                      (b, P(), P()))):
          g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=tuple(specs + [b] * len(extra)),
                                    out_specs=outs))
          compiled = g.lower(*args, *extra).compile()
          out[f"{name}/fast={fast}/masked={masked}"] = {
              "common": [testing.collective_counts(compiled, conditional=False),
                         testing.collective_bytes(compiled, conditional=False)],
              "branch": [testing.collective_counts(compiled, conditional=True),
                         testing.collective_bytes(compiled, conditional=True)],
          }
    print(json.dumps(out))
""")


def _measure(devices: int) -> dict:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _WORKER, str(C)], env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured():
  return {d: _measure(d) for d in (8, 64, 256)}


def test_collective_bytes_per_bn_call_do_not_grow_with_devices(measured):
  for key, at8 in measured[8].items():
    name, fast, masked = key.split("/")
    masked = masked == "masked=True"
    fwd_common = (1 + masked) * C * F32 + (2 + masked) * C * F32
    want_common = fwd_common if name == "fwd" else fwd_common + 2 * C * F32
    counts, nbytes = at8["common"]
    assert counts == {"all-reduce": 2 if name == "fwd" else 3}, key
    assert nbytes == {"all-reduce": want_common}, key
    assert at8["branch"] == [{}, {}], key  # no conditional: nothing runs only sometimes
    for devices in (64, 256):
      assert measured[devices][key] == at8, (key, devices)
