"""TorchScript beside torch-geometric.

torch-geometric (2.7+) replaces ``torch.index_select`` with a Python wrapper (for its
``HashTensor``); TorchScript then tries to compile that wrapper wherever scripted code calls
``torch.index_select`` and fails. metatensor-operations scripts such functions when it is
imported, so metatomic (``ekd-export``'s models, metatomic-ase) could not be imported after
torch-geometric. :func:`scriptable_index_select` tells TorchScript that the wrapper is the
``aten::index_select`` operator (eager calls still go through torch-geometric's wrapper).
"""

import torch


def scriptable_index_select() -> None:
    """Map a replaced ``torch.index_select`` to ``aten::index_select`` for TorchScript (no-op
    while it is torch's own); call it after importing torch-geometric."""
    if torch.index_select is not torch._C._VariableFunctions.index_select:
        torch.jit._builtins._register_builtin(torch.index_select, "aten::index_select")
