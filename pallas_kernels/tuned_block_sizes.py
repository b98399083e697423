"""Tuned tile sizes of the Pallas-Triton kernels, one table per stage.

Each entry holds keyword arguments of the stage's frozen ``BlockSizes`` dataclass (in
``pallas_kernels/<branch>/gpu.py``). These are the values the committed H200 measurements
(``docs/results/kernels.json``) ran with, chosen from the usual flash-attention shapes for
``D=128`` in bf16. Only the selected dK/dV tiling has been swept on the device
(``benchmarks/kernels.py --slc-parts``); the sweep over the others (``--variants``) has not
run. Kernels clamp them to short sequences and to shared memory, so the same table serves the
CPU interpret tests.
"""

from __future__ import annotations

# Banded flash attention (sliding window; compressed tokens use the same kernels).
SLIDING_WINDOW = dict(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=64,
                      num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=2)
COMPRESSED = dict(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=64,
                  num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=2)
# Group-centric selected attention: one program per (query, KV head) in the forward and dq;
# ``entries_per_chunk`` queries per program in the inverted-index dK/dV pass, gathered
# ``entries_per_step`` at a time. For dK/dV at 64k (commit 4d5fb60) 4 entries a step with 4
# warps measured 15.6 ms, against 29.3 ms with 8 warps and 19.3 ms with 8 entries and 8 warps.
SELECTED = dict(entries_per_chunk=256, entries_per_step=4, num_warps=4, num_stages=2,
                num_warps_bwd=4, num_stages_bwd=2)
# Fused scores + top-n: ``block_q`` queries per program, ``block_c`` compressed tokens a step.
SELECTION = dict(block_q=64, block_c=64, num_warps=4, num_stages=2)
