"""The ``pallas_mosaic`` backend: NSA stages as Mosaic (TPU) Pallas kernels.

Compressed, selected and sliding-window attention run as Pallas kernels with Mosaic forward
and backward passes. Block selection (``select_blocks``) is left to the next backend (the XLA
reference): it is a small ``[T, K, C]`` score pass plus a top-n whose cost is a fraction of the
attention branches, and XLA's sort-based ``top_k`` already runs on the TPU; see
``docs/tpu_design.md``.
"""

from __future__ import annotations

import functools
from typing import Any

from pallas_kernels.backend import Backend
from pallas_kernels.compressed import tpu as _cmp_tpu
from pallas_kernels.selected import tpu as _slc_tpu
from pallas_kernels.sliding_window import tpu as _swa_tpu

__all__ = ["BACKEND", "make_backend"]


def make_backend(interpret: Any = None) -> Backend:
    """The Mosaic backend.

    Args:
      interpret: ``None`` to compile for TPU; ``pltpu.InterpretParams(...)`` (or ``True``) to
        simulate the kernels on CPU, as the tests do.

    Returns:
      A :class:`Backend` named ``"pallas_mosaic"``, default on ``"tpu"``.
    """
    return Backend(
        name="pallas_mosaic",
        platforms=("tpu",),
        compressed_attention=functools.partial(_cmp_tpu.compressed_attention,
                                               interpret=interpret),
        select_blocks=None,
        selected_attention=functools.partial(_slc_tpu.selected_attention, interpret=interpret),
        sliding_window_attention=functools.partial(_swa_tpu.sliding_window_attention,
                                                   interpret=interpret),
    )


BACKEND = make_backend()
