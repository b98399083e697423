"""Helpers of the lowering tests (TPU and GPU): a stage's forward + VJP as one function, and
the ``pallas_call`` equations of a traced program."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fwd_and_bwd(fn, n_diff: int = 3):
    """``fn(*diff, *rest) -> (o, lse)`` as one function returning ``o``, ``lse`` and the VJP of
    the first ``n_diff`` arguments under a ones cotangent on ``o``."""
    def f(*args):
        diff, rest = args[:n_diff], args[n_diff:]
        (o, lse), vjp = jax.vjp(lambda *d: fn(*d, *rest), *diff)
        return o, lse, vjp((jnp.ones_like(o), jnp.zeros_like(lse)))
    return f


def pallas_eqns(jaxpr):
    """Every ``pallas_call`` equation in a jaxpr, looking inside nested jaxprs (jit, custom
    derivatives) but not inside the kernels themselves."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            out.append(eqn)
            continue
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    out += pallas_eqns(sub)
    return out
