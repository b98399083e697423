"""One table maps parameters to logical axes and logical axes to mesh axes.

Parameters are matched by their path in the model's state (``blocks/3/attn/q_proj/kernel``):
:data:`PARAM_LOGICAL_AXES` gives each dimension a logical name (``embed``, ``heads``, ...), and
:data:`LOGICAL_AXIS_RULES` maps each logical name to mesh axes of the training mesh
``(data, fsdp, tensor)``. Rules apply to any pytree whose leaf paths end with a parameter path,
so optimiser states (``mu``, ``nu``) shard exactly like their parameters.

A dimension whose size the mesh axes do not divide is replicated instead (the vocabulary of 259
byte tokens, for instance); :func:`param_partition_specs` reports those fallbacks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (a tuple: the dimension is split over all of them; None: replicated).
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": None,
    "compress": None,
}

# parameter path (regular expression, searched at the end of the leaf path) -> logical axes.
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"attn/q_proj/kernel$", ("embed", "heads")),
    (r"attn/kv_proj/kernel$", ("embed", "kv_heads")),
    (r"attn/o_proj/kernel$", ("heads", "embed")),
    (r"attn/gate_proj/kernel$", ("embed", "heads")),
    (r"attn/gate_proj/bias$", ("heads",)),
    (r"attn/compressor/\w+$", ("compress", "compress", "compress")),
    (r"mlp/(gate|up)/kernel$", ("embed", "mlp")),
    (r"mlp/down/kernel$", ("mlp", "embed")),
    (r"norm/scale$", ("norm",)),
)


def path_string(path) -> str:
    """``blocks/0/attn/q_proj/kernel`` for a ``jax.tree_util`` key path."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the leaf at ``path`` (all ``None`` when no rule matches)."""
    for pattern, axes in PARAM_LOGICAL_AXES:
        if re.search(pattern, path):
            return tuple(axes[:ndim]) + (None,) * max(0, ndim - len(axes))
    return (None,) * ndim


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int],
                    mesh_shape: Mapping[str, int]) -> tuple[PartitionSpec, list[str]]:
    """Mesh ``PartitionSpec`` for logical ``axes`` of an array of ``shape``.

    Returns:
      The spec, and a note for each dimension replicated because its size is not divisible by
      its mesh axes.
    """
    entries, notes, used = [], [], set()
    for dim, (name, size) in enumerate(zip(axes, shape, strict=True)):
        mesh_axes = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise ValueError(f"logical axis {name!r} has no rule; rules: "
                             f"{sorted(LOGICAL_AXIS_RULES)}")
        if not mesh_axes:
            entries.append(None)
            continue
        mesh_axes = tuple(a for a in mesh_axes if mesh_shape.get(a, 1) > 1 and a not in used)
        ways = 1
        for a in mesh_axes:
            ways *= mesh_shape[a]
        if ways == 1:
            entries.append(None)
        elif size % ways:
            notes.append(f"dim {dim} ({name}, size {size}) not divisible by {mesh_axes}={ways}")
            entries.append(None)
        else:
            used.update(mesh_axes)
            entries.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*entries), notes


def param_partition_specs(tree, mesh_shape: Mapping[str, int]):
    """``PartitionSpec`` for every leaf of ``tree`` (parameters, or an optimiser state).

    Args:
      tree: a pytree of arrays or ``jax.ShapeDtypeStruct``.
      mesh_shape: mesh axis sizes, e.g. ``{"data": 2, "fsdp": 2, "tensor": 2}``.

    Returns:
      ``(specs, notes)``: a pytree of ``PartitionSpec`` like ``tree`` and a dict from path to
      the replication fallbacks taken.
    """
    notes: dict[str, list[str]] = {}

    def one(path, leaf):
        p = path_string(path)
        shape = tuple(getattr(leaf, "shape", ()))
        spec, leaf_notes = logical_to_spec(logical_axes(p, len(shape)), shape, mesh_shape)
        if leaf_notes:
            notes[p] = leaf_notes
        return spec

    return jax.tree_util.tree_map_with_path(one, tree), notes


def named_shardings(tree, mesh: Mesh):
    """``NamedSharding`` for every leaf of ``tree`` on ``mesh`` (rules as in
    :func:`param_partition_specs`)."""
    specs, _ = param_partition_specs(tree, dict(mesh.shape))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(ndim: int = 2) -> PartitionSpec:
    """Spec of a ``[B, T, ...]`` input: batch over the ``batch`` rule's axes."""
    return PartitionSpec(LOGICAL_AXIS_RULES["batch"], *([None] * (ndim - 1)))


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes :data:`MESH_AXES` (``Auto`` axis types: XLA propagates shardings)."""
    sizes = tuple(int(shape[a]) for a in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)


__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "PARAM_LOGICAL_AXES",
    "batch_spec",
    "logical_axes",
    "logical_to_spec",
    "make_mesh",
    "named_shardings",
    "param_partition_specs",
    "path_string",
]
