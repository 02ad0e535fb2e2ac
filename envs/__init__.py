"""Gymnasium environments of keepgym and the machinery they drive.

Importing this package registers every environment id, so ``gym.make("RLPrune-VGG19-v0")`` works
after ``import keepgym``, and ``gym.make("keepgym:RLPrune-VGG19-v0")`` imports it on the fly.

* ``RLPrune-*``: :class:`keepgym.envs.prune_env.PruneEnv`, RL-Pruner's staged structured pruning.
* ``PatchSelect-*``: :class:`keepgym.envs.patch_select_env.PatchSelectEnv`, AgentViT's patch selection.
"""

from gymnasium.envs.registration import register, registry

__all__ = ["PruneEnv", "PatchSelectEnv", "PRUNE_ENV_IDS", "PATCH_ENV_IDS"]

# id -> default keyword arguments; every id accepts the env's other keyword arguments too.
PRUNE_ENV_IDS = {
    "RLPrune-VGG19-v0": {"model_name": "vgg19", "dataset": "cifar100"},
    "RLPrune-ResNet56-v0": {"model_name": "resnet56", "dataset": "cifar100"},
    "RLPrune-GoogLeNet-v0": {"model_name": "googlenet", "dataset": "cifar100"},
    "RLPrune-MobileNetV3-v0": {"model_name": "mobilenetv3_large", "dataset": "cifar100"},
    "RLPrune-DenseNet121-v0": {"model_name": "densenet121", "dataset": "cifar100"},
    "RLPrune-Digits-v0": {"model_name": "vgg11", "dataset": "digits", "width_mult": 0.25},
}
# *-LogPrior-v0: the same envs with ``action_param="log_prior"``: the action is a vector of log-factors in
# [-1, 1] around the width-proportional split, so the zero action every Gaussian policy starts from is a
# sensible allocation (PPO, SAC, A2C). A sibling, not a new version: the plain ids keep the split weights
# RLPruner searches over, and a "-v1" would make Gymnasium tell RLPruner users to "upgrade" to an action
# space RLPruner cannot use.
PRUNE_ENV_IDS.update(
    {
        _id.replace("-v0", "-LogPrior-v0"): {**_kw, "action_param": "log_prior"}
        for _id, _kw in list(PRUNE_ENV_IDS.items())
    }
)
PATCH_ENV_IDS = {
    "PatchSelect-CIFAR10-v0": {"dataset": "cifar10"},
    "PatchSelect-FashionMNIST-v0": {"dataset": "fashion_mnist", "image_size": 28, "patch_size": 4},
    "PatchSelect-Imagenette-v0": {"dataset": "imagenette", "image_size": 160, "patch_size": 16},
    "PatchSelect-Digits-v0": {
        "dataset": "digits", "dim": 64, "depth": 4, "heads": 4, "mlp_dim": 128, "dim_head": 16,
        "batch_size": 64, "augment": False,
    },
}
# v1: warm-up runs inside ``reset`` (the agent never stores a warm-up transition), timings are out of
# ``info`` by default and at least one patch per image is always kept. Gymnasium's rule is to bump ``-vN``
# whenever a change may affect learning results, so these are the ids to use and cite.
# v0 stays registered, with the same behaviour as v1, only so existing scripts keep running: the old v0
# (warm-up steps inside the agent's episode, rewarded 0) cannot be rebuilt without keeping that bug, and
# the change landed before any result was published with v0. Results should name v1.
PATCH_ENV_IDS.update({_id.replace("-v0", "-v1"): dict(_kw) for _id, _kw in list(PATCH_ENV_IDS.items())})

for _id, _kw in PRUNE_ENV_IDS.items():
    if _id not in registry:
        register(id=_id, entry_point="keepgym.envs.prune_env:PruneEnv", kwargs=dict(_kw))
for _id, _kw in PATCH_ENV_IDS.items():
    if _id not in registry:
        register(id=_id, entry_point="keepgym.envs.patch_select_env:PatchSelectEnv", kwargs=dict(_kw))


def __getattr__(name: str):
    if name == "PruneEnv":
        from keepgym.envs.prune_env import PruneEnv

        return PruneEnv
    if name == "PatchSelectEnv":
        from keepgym.envs.patch_select_env import PatchSelectEnv

        return PatchSelectEnv
    raise AttributeError(f"module 'keepgym.envs' has no attribute {name!r}")
