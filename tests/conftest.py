"""Test-suite settings: CPU only, one torch thread (tiny models run faster without thread contention)."""

import os

import torch

os.environ.setdefault("KEEPGYM_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_keepgym_cache"))
torch.set_num_threads(1)
