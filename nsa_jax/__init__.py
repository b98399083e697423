"""nsa-jax: Native Sparse Attention (Yuan et al., DeepSeek, arXiv 2502.11089) in JAX and Flax.

Axis alphabet, used in einsum strings, jaxtyping annotations and shape comments throughout:

    B batch            T query positions     S key positions      N query heads
    K key/value heads  G heads per group     H head dim           D model dim
    C compressed tokens                      M selected blocks (slots per query)
    J selection blocks in the sequence       L tokens in a block

Public entry points: :class:`NSAConfig`, :func:`nsa_attention` (functional NSA, dispatched to
kernels or the pure-jnp reference), :class:`NativeSparseAttention` (Flax NNX layer) and
:class:`NSATransformer` (a decoder LM), and for decoding :class:`NSACache` and
:func:`generate`.
"""

from nsa_jax.cache import NSACache
from nsa_jax.config import ModelConfig, NSAConfig
from nsa_jax.generate import generate
from nsa_jax.layers import CausalSelfAttention, NativeSparseAttention, NativeSparseAttentionLinen
from nsa_jax.model import NSATransformer
from nsa_jax.ops import NSAAux, nsa_attention

__all__ = [
    "CausalSelfAttention",
    "ModelConfig",
    "NSAAux",
    "NSACache",
    "NSAConfig",
    "NSATransformer",
    "NativeSparseAttention",
    "NativeSparseAttentionLinen",
    "generate",
    "nsa_attention",
]
__version__ = "0.1.0"
