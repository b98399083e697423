"""Entry point of ``python -m train`` and the ``nsa-train`` script."""

from __future__ import annotations

import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main())
