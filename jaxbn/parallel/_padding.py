"""Padding a last partial batch to the full batch size, with a mask of the real examples."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def pad_batch(batch: Any, batch_size: int) -> tuple[Any, np.ndarray]:
  """Pads every leaf of ``batch`` with zero rows up to ``batch_size``, and says which are real.

  The last batch of an epoch is usually smaller than the others. Dropping it loses examples;
  feeding it as is recompiles the train step for a new shape and may not split over the
  devices. Padding it to the usual size with a mask keeps one compiled step and every
  example: pass the mask to :func:`jaxbn.batch_norm` (``mask=mask[:, None, None, None]`` for
  NHWC input) so that padded rows do not enter the statistics — also across devices, where
  some hold only padding — and weight the loss with it.

  Args:
    batch: pytree of arrays (NumPy or JAX) with the same leading size ``n <= batch_size``.
    batch_size: the padded leading size (e.g. the usual global batch size).

  Returns:
    ``(padded, mask)``: the pytree with leading size ``batch_size`` (zeros after the first
    ``n`` rows; NumPy leaves stay NumPy) and a NumPy bool vector ``mask`` of length
    ``batch_size``, True for the ``n`` real rows.

  Raises:
    ValueError: leaves with different leading sizes, a scalar leaf, or ``n > batch_size``.

  Example:
    >>> import numpy as np
    >>> from jaxbn.parallel import pad_batch
    >>> batch = {'image': np.ones((5, 2), np.float32), 'label': np.arange(5)}
    >>> padded, mask = pad_batch(batch, 8)
    >>> padded['image'].shape, padded['label'].tolist(), mask.tolist()
    ((8, 2), [0, 1, 2, 3, 4, 0, 0, 0], [True, True, True, True, True, False, False, False])
  """
  leaves = jax.tree.leaves(batch)
  sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
  if None in sizes:
    raise ValueError("pad_batch: every leaf of `batch` needs a leading (batch) dimension; "
                     "got a scalar leaf.")
  if len(sizes) > 1:
    raise ValueError(f"pad_batch: the leaves of `batch` have different leading sizes "
                     f"{sorted(sizes)}; they must all be the batch size.")
  n = sizes.pop() if sizes else 0
  if n > batch_size:
    raise ValueError(f"pad_batch: the batch has {n} rows, more than `batch_size`="
                     f"{batch_size}; split it instead of padding it.")

  def pad(a):
    widths = [(0, batch_size - n)] + [(0, 0)] * (np.ndim(a) - 1)
    return np.pad(a, widths) if isinstance(a, np.ndarray) else jnp.pad(a, widths)

  return jax.tree.map(pad, batch), np.arange(batch_size) < n
