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
      selected_attention_combined: optional; ``f(q, k, v, indices, gates, o_cmp, o_swa, *,
        block_size, scale, forced_included)`` returning NSA's gated output
        ``combine(gates, o_cmp, selected_attention(...)[0], o_swa)`` with the same gradients,
        for a backend that can fold the combination into its selected-attention kernel.
        ``nsa_attention`` uses it only from the backend that supplies ``selected_attention``,
        and only when its ``pairs_with`` attribute is that very ``selected_attention`` (so a
        backend copied with another selected attention does not fold with the old kernel).
        It takes ``cmp_first`` (see ``compressed_attention_rows``).
      compressed_attention_rows: optional; ``f(q, k_cmp, v_cmp, *, block_size, stride, scale)
        -> (o_rows, lse, first)``, the compressed stage with its output as rows ``[B, R, N,
        Dv]``, row ``j`` query ``first + j``'s for ``j < T - first`` (earlier queries' outputs
        are 0; rows past them are ignored), where leaving the others out saves a copy.
        ``nsa_attention`` uses it only when it folds the combination, from the backend that
        supplies ``compressed_attention``, and only when its ``pairs_with`` attribute is that
        ``compressed_attention``; the fold then gets ``cmp_first=first``.
    """

    name: str
    platforms: tuple[str, ...] = ()
    compressed_attention: Callable | None = None
    select_blocks: Callable | None = None
    selected_attention: Callable | None = None
    sliding_window_attention: Callable | None = None
    selected_attention_combined: Callable | None = None
    compressed_attention_rows: Callable | None = None
