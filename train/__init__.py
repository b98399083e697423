"""Training NSA language models: configs, data, sharded steps, checkpoints, evaluation, CLI.

Run ``python -m train --config tiny`` (or the ``nsa-train`` script); see ``docs/training.md``.
"""
