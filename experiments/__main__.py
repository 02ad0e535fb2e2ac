"""``python -m experiments`` is the ``keepgym`` command."""

import sys

from experiments.cli import main

sys.exit(main())
