"""Pallas kernels for Native Sparse Attention, one folder per branch.

Each branch folder holds ``reference.py`` (a pure-jnp twin with the kernels' signature),
``gpu.py`` (Pallas lowered to Triton) and ``tpu.py`` (Pallas lowered to Mosaic). This package
never imports ``nsa_jax``: kernels know arrays and block sizes, not layers or configs.
"""
