"""Orbax checkpoints of the whole run: state (parameters, optimiser, step), data, config.

One ``CheckpointManager`` per run directory (``<output_dir>/checkpoints``), asynchronous by
default, keeping the newest ``max_to_keep`` steps. Each step holds three items:

- ``state``: ``{"params", "opt_state", "step"}``, restored straight into its shardings;
- ``data``: every process's data-iterator state (``process_<i>-of-<n>.json``, grain's handler);
- ``config``: the resolved ``TrainConfig`` as JSON.

Orbax writes a step into a temporary directory and renames it only once complete, and deletes
old steps only after a newer one is finalised, so a run killed mid-save loses nothing older.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from train.data import StateSnapshot


def manager(directory: str, *, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for ``directory`` (created if missing)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "data", "config"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, config: dict,
         *, force: bool = False) -> bool:
    """Starts saving ``step`` (asynchronously when the manager is); returns whether it saved.

    ``data_state`` is the iterator's ``get_state()`` taken at this step, so the live iterator
    may move on while the save runs.
    """
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(StateSnapshot(data_state)),
        config=ocp.args.JsonSave(config)), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, iterator):
    """Restores ``step`` into ``abstract_state``'s shapes and shardings and into ``iterator``.

    Args:
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.
      iterator: the data iterator, moved to the saved position in place.

    Returns:
      ``(state, config_dict)``.
    """
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator),
        config=ocp.args.JsonRestore()))
    return restored["state"], restored["config"]


def abstract_with_shardings(abstract_state, shardings):
    """``ShapeDtypeStruct`` leaves carrying ``shardings`` (the restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
