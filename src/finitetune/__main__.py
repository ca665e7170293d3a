"""``python -m finitetune`` (also what ``torchrun -m finitetune train`` runs)."""

import sys

from finitetune.cli.main import main

sys.exit(main())
