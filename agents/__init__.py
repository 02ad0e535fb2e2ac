"""Stable-Baselines3-style agents of keepgym.

* :class:`keepgym.agents.RLPruner`: RL-Pruner's Gaussian-noise policy over the layer distribution.
* :class:`keepgym.agents.UniformPruner`, :class:`keepgym.agents.GlobalPruner`: non-RL baselines, same interface.
* :class:`keepgym.agents.DDQN`: Double DQN (one Q head for ``Discrete``, a branching head for ``MultiBinary``).
"""

__all__ = ["RLPruner", "UniformPruner", "GlobalPruner", "DDQN"]

_WHERE = {
    "RLPruner": "keepgym.agents.rl_pruner",
    "UniformPruner": "keepgym.agents.baselines",
    "GlobalPruner": "keepgym.agents.baselines",
    "DDQN": "keepgym.agents.ddqn",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'keepgym.agents' has no attribute {name!r}")
