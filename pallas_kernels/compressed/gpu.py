"""Compressed-branch attention on GPU: the banded Pallas-Triton kernels with strided keys.

Compressed token ``i`` covers raw tokens ``[i*d, i*d + l)`` and becomes visible to query ``t``
once its block is complete, ``i*d + l - 1 <= t``. That is banded attention with key positions
``i*d + (l-1)`` and no lower edge, so this module reuses the flash kernels of
``sliding_window/gpu.py`` (forward, ``dq`` and atomics-free ``dk/dv``), which walk only the
key blocks a query block can see (``C/2`` of ``C`` on average).

A query with no visible token gets output 0 and log-sum-exp ``-inf``; when the sequence has
no compressed token at all (``T < l``) the kernels are not launched.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels import tuned_block_sizes
from pallas_kernels.common import default_scale
from pallas_kernels.sliding_window.gpu import BlockSizes, banded_attention, check_qkv

__all__ = ["BlockSizes", "compressed_attention"]


def compressed_attention(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    *,
    block_size: int,
    stride: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Attention of every query over the compressed tokens it may see; twin of ``reference.py``.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k_cmp: compressed keys ``[B, C, K, Dk]``; token ``i`` covers raw ``[i*d, i*d + l)``.
      v_cmp: compressed values ``[B, C, K, Dv]``.
      block_size: ``l``.
      stride: ``d``.
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      block_sizes: tiles; the tuned table by default.
      interpret: run in the Pallas interpreter.

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype`` and ``lse [B, T, N]`` in f32.
    """
    check_qkv(q, k_cmp, v_cmp, "compressed_attention")
    if block_size < 1 or stride < 1:
        raise ValueError(f"compressed_attention: block_size={block_size} and stride={stride} "
                         "must be >= 1")
    b, t, n, _ = q.shape
    c, dv = k_cmp.shape[1], v_cmp.shape[-1]
    if c == 0:
        return jnp.zeros((b, t, n, dv), q.dtype), jnp.full((b, t, n), -jnp.inf, jnp.float32)
    bs = block_sizes or BlockSizes(**tuned_block_sizes.COMPRESSED)
    return banded_attention(q, k_cmp, v_cmp, key_stride=int(stride),
                            key_offset=int(block_size) - 1, window=None,
                            scale=default_scale(q.shape[-1], scale), block_sizes=bs,
                            interpret=interpret, name="cmp")
