"""The Pallas-Triton GPU backend: the four NSA stages as Pallas kernels lowered to Triton.

``BACKEND`` is registered lazily by ``nsa_jax.registry`` as ``"pallas_triton"`` (the default on
GPU); ``make_backend(interpret=True)`` runs the same kernels in the Pallas interpreter, which
is how the CPU tests check them. Each stage raises ``NotImplementedError`` for shapes its kernel
does not take, and the registry then falls back to the pure-jnp reference.

Sliding window: cuDNN's windowed flash attention computes the output (and its gradient) where
it applies (16-bit inputs, equal head dims <= 128), because it measured faster than the banded
Pallas kernel (``benchmarks/kernels.py``, ``docs/gpu_kernels.md``); the banded kernel supplies
the log-sum-exp, and the whole stage elsewhere. ``make_backend(window="pallas")`` keeps the
banded kernel for everything.

Compressed attention: cuDNN's causal flash attention over the queries split by residue
(``compressed.gpu.compressed_attention_cudnn``) computes the output, the log-sum-exp and the
gradients where it applies (16-bit inputs, equal head dims <= 128), else the banded kernels;
``make_backend(compressed="pallas")`` keeps the banded kernels for everything.

``make_backend(window_stream=N)`` runs the window stage (forward and backward) on the GPU's
execution stream ``N`` (``jax.experimental.compute_on`` with ``"gpu_stream:N"``), so that
XLA may overlap it with the other branches' kernels, which do not depend on it. Other
platforms ignore the annotation.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.compute_on import compute_on

from pallas_kernels import tuned_block_sizes
from pallas_kernels.backend import Backend
from pallas_kernels.compressed import gpu as compressed_gpu
from pallas_kernels.selected import gpu as selected_gpu
from pallas_kernels.selection import gpu as selection_gpu
from pallas_kernels.sliding_window import gpu as sliding_window_gpu


def on_stream(fn, stream: int):
    """``fn(*arrays, **static)`` with its arrays' computation (and, under differentiation, its
    backward) on GPU execution stream ``stream``; keyword arguments stay static."""
    if stream < 1:
        raise ValueError(f"stream={stream} must be >= 1 (0 is XLA's main compute stream)")

    @functools.wraps(fn)
    def call(*arrays, **static):
        return compute_on(functools.partial(fn, **static), compute_type=f"gpu_stream:{stream}",
                          out_memory_spaces=jax.memory.Space.Device)(*arrays)

    return call


def make_backend(interpret: bool = False, name: str | None = None,
                 window: str = "cudnn", compressed: str = "cudnn",
                 forced_band: bool = False, window_stream: int | None = None) -> Backend:
    """The GPU stages, or their interpreted twins on CPU with ``interpret=True``.

    ``window``: ``"cudnn"`` (cuDNN for the window's output where it applies, the default) or
    ``"pallas"`` (the banded kernel only). ``compressed``: ``"cudnn"`` (cuDNN over the residue
    classes where it applies, the default) or ``"pallas"`` (the banded kernels only).
    ``forced_band``: the selected branch's forced blocks as a band
    (``selected.gpu.BlockSizes.forced_band``; off by default). ``window_stream``: run the window
    stage on that GPU execution stream (``on_stream``; off: measured no faster).
    """
    for arg, val in (("window", window), ("compressed", compressed)):
        if val not in ("cudnn", "pallas"):
            raise ValueError(f"{arg}={val!r}: expected 'cudnn' or 'pallas'")
    cmp = (compressed_gpu.compressed_attention_cudnn if compressed == "cudnn"
           else compressed_gpu.compressed_attention)
    swa = (sliding_window_gpu.sliding_window_attention_cudnn if window == "cudnn"
           else sliding_window_gpu.sliding_window_attention)
    slc_sizes = (selected_gpu.BlockSizes(**{**tuned_block_sizes.SELECTED, "forced_band": True})
                 if forced_band else None)
    selected = functools.partial(selected_gpu.selected_attention, interpret=interpret,
                                 block_sizes=slc_sizes)
    combined = functools.partial(selected_gpu.selected_attention_combined, interpret=interpret,
                                 block_sizes=slc_sizes)
    combined.pairs_with = selected  # nsa_attention folds only with this selected attention
    compressed_attention = functools.partial(cmp, interpret=interpret)
    cmp_rows = None
    if compressed == "cudnn":  # its output rows read in place by the fold
        cmp_rows = functools.partial(compressed_gpu.compressed_attention_cudnn_rows,
                                     interpret=interpret)
        cmp_rows.pairs_with = compressed_attention
    return Backend(
        name=name or ("pallas_triton_interpret" if interpret else "pallas_triton"),
        platforms=() if interpret else ("gpu",),
        compressed_attention=compressed_attention,
        select_blocks=functools.partial(selection_gpu.select_blocks, interpret=interpret),
        selected_attention=selected,
        sliding_window_attention=(functools.partial(swa, interpret=interpret)
                                  if window_stream is None else
                                  on_stream(functools.partial(swa, interpret=interpret),
                                            window_stream)),
        selected_attention_combined=combined,
        compressed_attention_rows=cmp_rows,
    )


BACKEND = make_backend()
# The same kernels with the banded compressed kernels (registered as "pallas_triton_banded_cmp"):
# about 2 GiB less peak memory at 64k (the cuDNN path keeps its per-residue copy of the
# queries and its own output for the backward), slower (docs/gpu_kernels.md).
BANDED_CMP_BACKEND = make_backend(compressed="pallas", name="pallas_triton_banded_cmp")
# The default with the selected branch's forced blocks as a band ("pallas_triton_forced_band"),
# measured slower than the per-query kernels on the H200 (docs/gpu_kernels.md); kept to
# reproduce that measurement.
FORCED_BAND_BACKEND = make_backend(forced_band=True, name="pallas_triton_forced_band")
# The default with the window stage on a second GPU stream ("pallas_triton_window_stream"),
# to overlap it with the other branches: measured no faster (docs/gpu_kernels.md).
WINDOW_STREAM_BACKEND = make_backend(window_stream=1, name="pallas_triton_window_stream")
# The default with the banded Pallas window kernel for the whole window stage
# ("pallas_triton_pallas_window"), and with the banded kernels for both the window and the
# compressed stage ("pallas_triton_all_pallas"): cuDNN was chosen at the paper's shape, these
# time the other choices at other shapes (the training model's, say).
PALLAS_WINDOW_BACKEND = make_backend(window="pallas", name="pallas_triton_pallas_window")
ALL_PALLAS_BACKEND = make_backend(window="pallas", compressed="pallas",
                                  name="pallas_triton_all_pallas")
