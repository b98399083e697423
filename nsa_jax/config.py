"""NSA hyper-parameters: one frozen, validated dataclass.

Field names follow the paper's symbols (see ``shared/NSA_SPEC.md``): ``cmp_block_size`` is
``l``, ``cmp_stride`` is ``d``, ``slc_block_size`` is ``l'``, ``slc_top_n`` is ``n`` and
``window_size`` is ``w``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

CmpKind = Literal["mlp", "mean", "linear"]
KVMode = Literal["separate", "shared"]

CMP_KINDS: tuple[str, ...] = ("mlp", "mean", "linear")
KV_MODES: tuple[str, ...] = ("separate", "shared")

# Selection always keeps block 0 and the two most recent blocks (the current block and the one
# before it). They count inside ``slc_top_n``.
NUM_INIT_BLOCKS = 1
NUM_LOCAL_BLOCKS = 2
NUM_FORCED_BLOCKS = NUM_INIT_BLOCKS + NUM_LOCAL_BLOCKS


@dataclasses.dataclass(frozen=True, kw_only=True)
class NSAConfig:
    """Configuration of one NSA attention layer (paper defaults).

    Attributes:
      cmp_block_size: ``l``, raw tokens summarised by one compressed token.
      cmp_stride: ``d``, distance between consecutive compressed blocks; divides ``l`` and ``l'``.
      slc_block_size: ``l'``, tokens per selection block; ``l <= l'``.
      slc_top_n: ``n``, blocks attended per query and KV group, the 3 forced blocks included.
      window_size: ``w``, keys ``[t - w + 1, t]`` in the sliding-window branch.
      cmp_kind: the compression function ``phi``: ``"mlp"`` (the paper's: intra-block position
        embedding, then an MLP over the flattened block), ``"mean"`` or ``"linear"``.
      cmp_mlp_hidden: hidden width of the ``"mlp"`` compressor; ``None`` means the head dim.
      kv_mode: ``"separate"`` (the paper's: independent keys and values per branch) or
        ``"shared"`` (one key/value projection for all three branches).
      softmax_scale: logit scale of every branch; ``None`` means ``1 / sqrt(Dk)``.
    """

    cmp_block_size: int = 32
    cmp_stride: int = 16
    slc_block_size: int = 64
    slc_top_n: int = 16
    window_size: int = 512
    cmp_kind: CmpKind = "mlp"
    cmp_mlp_hidden: int | None = None
    kv_mode: KVMode = "separate"
    softmax_scale: float | None = None

    def __post_init__(self):
        ints = {
            "cmp_block_size": self.cmp_block_size,
            "cmp_stride": self.cmp_stride,
            "slc_block_size": self.slc_block_size,
            "slc_top_n": self.slc_top_n,
            "window_size": self.window_size,
        }
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"NSAConfig.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"NSAConfig.{name} must be >= 1, got {name}={value}")
        l, d, lp = self.cmp_block_size, self.cmp_stride, self.slc_block_size
        if l % d:
            raise ValueError(
                f"cmp_stride must divide cmp_block_size: cmp_block_size={l}, cmp_stride={d}"
            )
        if lp % d:
            raise ValueError(
                f"cmp_stride must divide slc_block_size: slc_block_size={lp}, cmp_stride={d}"
            )
        if l > lp:
            raise ValueError(
                f"cmp_block_size must not exceed slc_block_size: cmp_block_size={l}, "
                f"slc_block_size={lp}"
            )
        if self.slc_top_n < NUM_FORCED_BLOCKS:
            raise ValueError(
                f"slc_top_n={self.slc_top_n} is smaller than the {NUM_FORCED_BLOCKS} forced blocks "
                f"({NUM_INIT_BLOCKS} initial + {NUM_LOCAL_BLOCKS} local) it must include"
            )
        if self.cmp_kind not in CMP_KINDS:
            raise ValueError(f"cmp_kind={self.cmp_kind!r} is not one of {CMP_KINDS}")
        if self.kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode={self.kv_mode!r} is not one of {KV_MODES}")
        if self.cmp_mlp_hidden is not None and (
            not isinstance(self.cmp_mlp_hidden, int) or self.cmp_mlp_hidden < 1
        ):
            raise ValueError(f"cmp_mlp_hidden must be a positive int, got {self.cmp_mlp_hidden!r}")
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise ValueError(f"softmax_scale must be > 0, got {self.softmax_scale!r}")

    def replace(self, **changes) -> NSAConfig:
        """Returns a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def num_cmp_tokens(self, seq_len: int) -> int:
        """Compressed tokens that exist for ``seq_len`` raw tokens: ``max(0, (T - l)//d + 1)``."""
        return num_cmp_tokens(seq_len, self.cmp_block_size, self.cmp_stride)

    def num_slc_blocks(self, seq_len: int) -> int:
        """Selection blocks covering ``seq_len`` tokens: ``ceil(T / l')``."""
        return -(-seq_len // self.slc_block_size)

    def keys_per_query(self, seq_len: int) -> float:
        """The spec's cost model: keys visited per query, averaged over a causal sequence."""
        return seq_len / (2 * self.cmp_stride) + self.slc_top_n * self.slc_block_size + (
            self.window_size
        )


def num_cmp_tokens(seq_len: int, block_size: int, stride: int) -> int:
    """``max(0, (T - l)//d + 1)``: compressed tokens whose whole block lies in ``[0, T)``."""
    if seq_len < block_size:
        return 0
    return (seq_len - block_size) // stride + 1


ATTENTION_KINDS: tuple[str, ...] = ("nsa", "full", "window")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# The keys of ``ops.REMAT_POLICIES`` (config.py imports nothing of the kernels).
REMAT_POLICY_NAMES: tuple[str, ...] = ("attention_out", "selection", "nothing")
# The branches ``low_memory`` can recompute in the backward pass, in the order the backward
# takes them (the selected one, the compressed one, the window).
LOW_MEMORY_BRANCHES: tuple[str, ...] = ("selected", "compressed", "window")


def low_memory_branches(low_memory) -> tuple[str, ...]:
    """The branches a ``low_memory`` setting recomputes in the backward pass.

    ``False`` (or ``None``, ``""``): none; ``True``: all three; a branch name, a comma-separated
    list of them (``"compressed,window"``) or a sequence of them: those. Returned in
    ``LOW_MEMORY_BRANCHES`` order.
    """
    if low_memory is None or low_memory is False:
        return ()
    if low_memory is True:
        return LOW_MEMORY_BRANCHES
    if isinstance(low_memory, str):
        names = [n.strip() for n in low_memory.split(",") if n.strip()]
    elif isinstance(low_memory, (tuple, list, frozenset, set)):
        names = list(low_memory)
    else:
        raise TypeError(f"low_memory must be a bool, a branch name or a sequence of them "
                        f"{LOW_MEMORY_BRANCHES}, got {low_memory!r}")
    unknown = [n for n in names if n not in LOW_MEMORY_BRANCHES]
    if unknown:
        raise ValueError(f"low_memory={low_memory!r}: unknown branch {unknown}; the branches "
                         f"are {LOW_MEMORY_BRANCHES}")
    return tuple(n for n in LOW_MEMORY_BRANCHES if n in names)



@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only language model (RMSNorm, SwiGLU, GQA, RoPE) with NSA or a baseline.

    Attributes:
      vocab_size: token vocabulary (byte-level default: 256 bytes + 3 specials).
      d_model: residual width ``D``.
      num_layers: transformer blocks.
      num_heads: query heads ``N``.
      num_kv_heads: key/value heads ``K``; divides ``num_heads``.
      head_dim: query/key head dim ``Dk``.
      v_head_dim: value head dim ``Dv`` (``None``: ``head_dim``).
      mlp_hidden: SwiGLU hidden width.
      attention: ``"nsa"``, ``"full"`` (causal dense, cuDNN on GPU) or ``"window"`` (causal
        sliding window of ``nsa.window_size`` keys).
      nsa: the NSA layer configuration (its window also sets ``"window"`` attention's).
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon.
      tie_embeddings: share the embedding matrix with the output projection.
      dtype: compute dtype of activations and attention.
      param_dtype: storage dtype of parameters (f32 master weights by default).
      implementation: NSA backend name for ``nsa_attention`` (``None``: platform default).
      low_memory: NSA's backward recomputes its branches one at a time
        (``nsa_attention(..., low_memory=True)``): less memory, one more forward of the
        attention branches; a branch name or comma-separated names (``"window"``,
        ``"compressed,window"``) recompute those only and keep the others' residuals.
      remat: rematerialise each block in the backward pass (saves activation memory).
      remat_policy: what a rematerialised block keeps (``ops.REMAT_POLICIES``):
        ``"attention_out"`` (every attention layer's output, so NSA's gated sum is not
        recomputed for the output projection's gradient, and NSA's results outside its
        attention kernels: selected blocks, phi's outputs, gates, the cuDNN path's query
        rows), ``"selection"`` (the selected blocks alone) or ``"nothing"``.
    """

    vocab_size: int = 259
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    v_head_dim: int | None = None
    mlp_hidden: int = 704
    attention: str = "nsa"
    nsa: NSAConfig = dataclasses.field(default_factory=NSAConfig)
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    implementation: str | None = None
    low_memory: bool | str = False
    remat: bool = False
    remat_policy: str = "attention_out"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.v_head_dim is not None and self.v_head_dim < 1:
            raise ValueError(f"v_head_dim must be positive, got {self.v_head_dim}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.remat_policy not in REMAT_POLICY_NAMES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of "
                             f"{REMAT_POLICY_NAMES}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_KINDS}")
        low_memory_branches(self.low_memory)  # raises on a bad value
        if not isinstance(self.nsa, NSAConfig):
            raise TypeError(f"nsa must be an NSAConfig, got {type(self.nsa).__name__}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {DTYPES}")

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
