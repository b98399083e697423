"""Which code computes each NSA stage: one registry of backends, with fallback.

A backend supplies any subset of the four stages (each with the signature of its pure-jnp twin
in ``pallas_kernels/<branch>/reference.py``). A stage it leaves out, or that raises
``NotImplementedError`` for the given shapes, falls through to the next backend in the chain,
and the chain always ends with ``"reference"``, the exact pure-jnp implementation.

Kernel backends are registered lazily by import path, so importing ``nsa_jax`` never imports
Triton or Mosaic code.
"""

from __future__ import annotations

import importlib
import warnings

import jax

from pallas_kernels.backend import Backend
from pallas_kernels.compressed import reference as _cmp_ref
from pallas_kernels.selected import reference as _slc_ref
from pallas_kernels.selection import reference as _sel_ref
from pallas_kernels.sliding_window import reference as _swa_ref

__all__ = ["Backend", "REFERENCE", "STAGES"]

STAGES = ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention")

REFERENCE = Backend(
    name="reference",
    platforms=("cpu", "gpu", "tpu"),
    compressed_attention=_cmp_ref.compressed_attention,
    select_blocks=_sel_ref.select_blocks,
    selected_attention=_slc_ref.selected_attention,
    sliding_window_attention=_swa_ref.sliding_window_attention,
)

# name -> Backend, or "module:attribute" to import on first use.
_BACKENDS: dict[str, Backend | str] = {"reference": REFERENCE}
# platform -> backend names to try first, most preferred first.
_DEFAULTS: dict[str, list[str]] = {}


def register_backend(
    backend: Backend | str, name: str | None = None, default_on: tuple[str, ...] = ()
) -> None:
    """Adds a backend, or a lazy ``"module:attribute"`` path to one (then ``name`` is required).

    The backend becomes the first choice on each platform in ``default_on`` and, for a loaded
    ``Backend``, on each of its ``platforms``.
    """
    if isinstance(backend, str):
        if not name:
            raise ValueError(f"a lazy backend path needs a name: {backend!r}")
        _BACKENDS[name] = backend
        platforms = default_on
    else:
        name = backend.name
        _BACKENDS[name] = backend
        platforms = tuple(default_on) + tuple(backend.platforms)
    for platform in platforms:
        set_default(platform, name)


def set_default(platform: str, name: str) -> None:
    """Makes backend ``name`` (possibly still lazy) the first choice on ``platform``."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {sorted(_BACKENDS)}")
    order = _DEFAULTS.setdefault(platform, [])
    if name in order:
        order.remove(name)
    order.insert(0, name)


def available_backends() -> list[str]:
    """Names of all registered backends (lazy ones included)."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name``, importing it first if it was registered lazily."""
    entry = _BACKENDS.get(name)
    if entry is None:
        raise ValueError(f"unknown NSA implementation {name!r}; choose from {available_backends()}")
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attr)
        missing = [s for s in ("name", *STAGES) if not hasattr(entry, s)]
        if missing:
            raise TypeError(f"{module_name}:{attr} is not a backend: it lacks {missing}")
        _BACKENDS[name] = entry
    return entry


def resolve(implementation: str | None = None, platform: str | None = None) -> tuple[Backend, ...]:
    """The chain of backends to try for each stage, ending with the reference.

    Args:
      implementation: a backend name; ``None`` picks the default for ``platform``.
      platform: defaults to ``jax.default_backend()``.
    """
    if implementation is not None:
        chain = [get_backend(implementation)]
    else:
        platform = platform or jax.default_backend()
        chain = []
        for name in _DEFAULTS.get(platform, []):
            try:
                chain.append(get_backend(name))
            except ImportError as err:  # a kernel backend whose dependencies are missing
                warnings.warn(f"NSA backend {name!r} unavailable ({err}); falling back",
                              stacklevel=2)
    if REFERENCE not in chain:
        chain.append(REFERENCE)
    return tuple(chain)


def call_stage(chain: tuple[Backend, ...], stage: str, *args, **kwargs):
    """Runs ``stage`` with the first backend in ``chain`` that implements it for these inputs."""
    if stage not in STAGES:
        raise ValueError(f"unknown NSA stage {stage!r}; stages are {STAGES}")
    for backend in chain:
        fn = getattr(backend, stage)
        if fn is None:
            continue
        try:
            return fn(*args, **kwargs)
        except NotImplementedError:
            if backend is chain[-1]:
                raise
    raise RuntimeError(f"no backend in {[b.name for b in chain]} implements {stage}")


# Kernel backends, imported on first use. Each module exposes ``BACKEND`` (a ``Backend``) and
# ``make_backend(interpret=...)`` for tests.
register_backend("pallas_kernels.gpu_backend:BACKEND", name="pallas_triton", default_on=("gpu",))
register_backend("pallas_kernels.gpu_backend:BANDED_CMP_BACKEND", name="pallas_triton_banded_cmp")
register_backend("pallas_kernels.gpu_backend:FORCED_BAND_BACKEND",
                 name="pallas_triton_forced_band")
register_backend("pallas_kernels.gpu_backend:WINDOW_STREAM_BACKEND",
                 name="pallas_triton_window_stream")
register_backend("pallas_kernels.gpu_backend:PALLAS_WINDOW_BACKEND",
                 name="pallas_triton_pallas_window")
register_backend("pallas_kernels.gpu_backend:ALL_PALLAS_BACKEND", name="pallas_triton_all_pallas")
register_backend("pallas_kernels.tpu_backend:BACKEND", name="pallas_mosaic", default_on=("tpu",))
