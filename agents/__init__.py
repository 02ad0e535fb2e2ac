"""Stable-Baselines3-style agents of keepgym.

* :class:`agents.RLPruner`: RL-Pruner's Gaussian-noise policy over the layer distribution.
* :class:`agents.UniformPruner`, :class:`agents.GlobalPruner`: non-RL baselines, same interface.
* :class:`agents.DDQN`: Double DQN (one Q head for ``Discrete``, a branching head for ``MultiBinary``).
"""

__all__ = ["RLPruner", "UniformPruner", "GlobalPruner", "DDQN"]

_WHERE = {
    "RLPruner": "agents.rl_pruner",
    "UniformPruner": "agents.baselines",
    "GlobalPruner": "agents.baselines",
    "DDQN": "agents.ddqn",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")
