"""Interoperability with PyTorch: ``BatchNorm*d`` state dicts, kernel layouts, conventions.

* :func:`from_torch_batch_norm` / :func:`to_torch_batch_norm`: a ``torch.nn.BatchNorm*d``
  state dict (or module) to jaxbn's ``(BatchStats, scale, bias)`` and back;
* :func:`torch_batch_norm_config`: the jaxbn options (momentum, epsilon, axis, ...) that
  reproduce a PyTorch module;
* :func:`kernel_from_torch` / :func:`kernel_to_torch`: conv/linear weights between PyTorch's
  ``OIHW`` and flax's ``HWIO`` layouts.

Nothing here imports torch: tensors are read through ``.detach().cpu().numpy()``.
"""

from jaxbn.interop._torch import (BatchNormVariables, from_torch_batch_norm, kernel_from_torch,
                                  kernel_to_torch, to_torch_batch_norm, torch_batch_norm_config)

__all__ = [
    "BatchNormVariables",
    "from_torch_batch_norm",
    "kernel_from_torch",
    "kernel_to_torch",
    "to_torch_batch_norm",
    "torch_batch_norm_config",
]
