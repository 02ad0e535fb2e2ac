"""keepgym: Gymnasium environments and SB3-style agents that decide what a vision model keeps.

``import keepgym`` registers every environment id (``RLPrune-*``, ``PatchSelect-*``), so
``gym.make("RLPrune-VGG19-v0")`` works after it, and ``gym.make("keepgym:RLPrune-VGG19-v0")`` imports
it for you. The parts install as one package:

* :mod:`keepgym.models`: the CNN zoo and the ViT, model files.
* :mod:`keepgym.envs`: ``PruneEnv`` (RL-Pruner) and ``PatchSelectEnv`` (AgentViT) and their machinery.
* :mod:`keepgym.agents`: ``RLPruner``, ``UniformPruner``, ``GlobalPruner``, ``DDQN``, callbacks.
* :mod:`keepgym.experiments`: the ``keepgym`` command line.

The source folders ``envs/ agents/ models/ experiments/`` sit at the repository root; ``setup.cfg``
maps them to ``keepgym.*`` (``package_dir``).
"""

from keepgym import envs as _envs  # noqa: F401  (registers the env ids)

__all__ = ["__version__"]

__version__ = "0.2.0"
