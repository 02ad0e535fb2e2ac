"""The methods ``keepgym frontier`` compares: how each runs ``keepgym prune`` and its label."""

from __future__ import annotations

__all__ = ["DEFAULT_METHODS", "LABELS", "METHODS", "METHOD_OPTIONS"]

#: method -> (keepgym prune --algo, --criterion)
METHODS: dict[str, tuple[str, str]] = {
    "rlpruner": ("rlpruner", "taylor"),
    "uniform": ("uniform", "taylor"),
    "global": ("global", "taylor"),
    "tp": ("uniform", "l2"),
    "rlpruner-l2": ("rlpruner", "l2"),
    "rlpruner-racing": ("rlpruner", "taylor"),
    "ppo": ("ppo", "taylor"),
    "sac": ("sac", "taylor"),
    "ppo-v0": ("ppo", "taylor"),
}
#: further ``keepgym prune`` settings of a method. PPO and SAC get as many committed stages in all as
#: RL-Pruner evaluates candidates (``--episodes K x E``): equal numbers of evaluated allocations.
METHOD_OPTIONS: dict[str, dict[str, object]] = {
    "rlpruner-racing": {"racing": True},
    "ppo": {"action_param": "log_prior"},
    "sac": {"action_param": "log_prior"},
    "ppo-v0": {"action_param": "weights"},
}
#: what ``--methods`` runs unless told otherwise (``rlpruner-l2`` separates allocation from criterion)
DEFAULT_METHODS = ("rlpruner", "uniform", "global", "tp")
LABELS = {
    "rlpruner": "RL-Pruner (Taylor)",
    "uniform": "uniform (Taylor)",
    "global": "global (Taylor)",
    "tp": "Torch-Pruning default (L2 magnitude, uniform)",
    "rlpruner-l2": "RL-Pruner (L2 magnitude)",
    "rlpruner-racing": "RL-Pruner (Taylor, racing)",
    "ppo": "PPO (log-prior actions)",
    "sac": "SAC (log-prior actions)",
    "ppo-v0": "PPO (split weights, v0)",
}
