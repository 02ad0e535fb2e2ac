"""Runnable jobs and the ``keepgym`` command line (train, prune, agentvit, evaluate, bench, demo)."""
