"""The one tolerance table: relative error ``||out - ref|| / ||ref||`` allowed per dtype.

From the spec's "Numerics": float32 under 1e-5, bf16 under 2e-2, for outputs and gradients.
"""

import jax.numpy as jnp
import numpy as np

RTOL = {
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float16): 2e-2,
}


def rel_err(out, ref) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives inf."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shapes differ: {out.shape} vs {ref.shape}")
    if np.isnan(out).any() or np.isnan(ref).any():
        return float("inf")
    denom = np.linalg.norm(ref.ravel())
    diff = np.linalg.norm((out - ref).ravel())
    if denom == 0.0:
        return float(diff)
    return float(diff / denom)


def assert_close(out, ref, dtype, what: str = "", factor: float = 1.0) -> None:
    """Asserts the relative error is within the table's value for ``dtype`` (times ``factor``)."""
    tol = RTOL[jnp.dtype(dtype)] * factor
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({jnp.dtype(dtype)})"
