"""``python -m keepgym.experiments`` is the ``keepgym`` command."""

import sys

from keepgym.experiments.cli import main

sys.exit(main())
