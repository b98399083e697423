"""Tuned tile sizes of the Pallas-Triton kernels, one table per stage.

Each entry holds keyword arguments of the stage's frozen ``BlockSizes`` dataclass (in
``pallas_kernels/<branch>/gpu.py``). These are the values the committed H200 measurements
(``docs/results/kernels.json``) ran with. The banded tiles and the selected dK/dV tiling come
from sweeps on the device (``benchmarks/kernels.py --variants`` and ``--slc-parts``); the
others are the usual flash-attention shapes for ``D=128`` in bf16. Kernels clamp them to short
sequences and to shared memory, so the same table serves the CPU interpret tests.
"""

from __future__ import annotations

# Banded flash attention (sliding window; compressed tokens use the same kernels). Swept at 64k
# on the H200 (``--variants``, commit e77f2e6, docs/results/kernels_variants.md): masking only
# the blocks at the band's edges took the compressed forward from 16.6 to 12.2 ms and three
# pipeline stages to 11.3 ms; forward+backward 51.7 -> 42.7 ms with 128-key dk/dv programs.
SLIDING_WINDOW = dict(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=64,
                      num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=2,
                      mask_edges_only=True)
COMPRESSED = dict(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=128,
                  num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=3,
                  mask_edges_only=True)
# Group-centric selected attention: one program per (query, KV head) in the forward and dq;
# ``entries_per_chunk`` queries per program in the inverted-index dK/dV pass, gathered
# ``entries_per_step`` at a time. For dK/dV at 64k (commit 4d5fb60) 4 entries a step with 4
# warps measured 15.6 ms, against 29.3 ms with 8 warps and 19.3 ms with 8 entries and 8 warps.
# Forward and dq with 2 warps (commit 140746f, docs/results/kernels_variants_140746f.md, 64k):
# forward 15.75 against 16.24 ms with 4, forward + backward 47.0 against 50.4 ms; one stage
# (more programs per SM) 25 ms, three 17 ms. A 32k training step: 177.2 against 184.5 ms.
SELECTED = dict(entries_per_chunk=256, entries_per_step=4, num_warps=2, num_stages=2,
                num_warps_bwd=4, num_stages_bwd=2)
# The selected forward and dq at head dims of at most ``SMALL_HEAD_DIM`` (the 125M model: 16
# query heads on one KV head, D=64) with one warp: interleaved 32k training steps of that model
# (commit 75b38e8, docs/results/train_32k_interleaved_tiles_75b38e8.*) took 168.48 against
# 170.50 ms with 2 warps, lower in each of 8 rounds; the forward and dq at that shape had
# measured 1.25 / 4.17 against 1.29 / 4.40 ms (commit fb636a6, kernels_variants_125m_fb636a6.md).
SELECTED_SMALL_HEADS = dict(num_warps=1)
SMALL_HEAD_DIM = 64


def selected(head_dim: int) -> dict:
    """The ``SELECTED`` entry for a head dim (the larger of Dk and Dv)."""
    return {**SELECTED, **(SELECTED_SMALL_HEADS if head_dim <= SMALL_HEAD_DIM else {})}


# Fused scores + top-n: ``block_q`` queries per program, ``block_c`` compressed tokens a step,
# block scores by tf32x3 dots. At 64k (H200, commits e77f2e6 and 20a4330): 16.7 ms, against
# 17.2 ms with float32 FMA dots and 25-35 ms with the head-packed layout (``pack_heads``); a
# probe that merges one block a chunk took 15.3 ms, so the running top-n costs about 1.7 ms and
# the rest is the per-head scores. Three pipeline stages (commit 140746f): 10.9 against 13.2 ms
# with two (one: 13.3; eight warps with one stage: 19.9).
SELECTION = dict(block_q=64, block_c=64, num_warps=4, num_stages=3, overlap_tf32x3=True)
