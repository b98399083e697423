"""The shape of a kernel backend: a named set of NSA stage implementations.

Defined here, not in ``nsa_jax``, so each ``*_backend.py`` module can build one without
importing the library; ``nsa_jax.registry`` re-exports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Backend:
    """A named set of stage implementations.

    Attributes:
      name: the name users pass as ``implementation=``.
      platforms: JAX platforms (``"gpu"``, ``"tpu"``, ``"cpu"``) on which this backend is the
        default.
      compressed_attention, select_blocks, selected_attention, sliding_window_attention: the
        stage functions (signatures of the twins in ``<branch>/reference.py``), or ``None`` to
        use the next backend's.
    """

    name: str
    platforms: tuple[str, ...] = ()
    compressed_attention: Callable | None = None
    select_blocks: Callable | None = None
    selected_attention: Callable | None = None
    sliding_window_attention: Callable | None = None
    selected_attention_combined: Callable | None = None
