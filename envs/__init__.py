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
PATCH_ENV_IDS = {
    "PatchSelect-CIFAR10-v0": {"dataset": "cifar10"},
    "PatchSelect-FashionMNIST-v0": {"dataset": "fashion_mnist", "image_size": 28, "patch_size": 4},
    "PatchSelect-Imagenette-v0": {"dataset": "imagenette", "image_size": 160, "patch_size": 16},
    "PatchSelect-Digits-v0": {
        "dataset": "digits", "dim": 64, "depth": 4, "heads": 4, "mlp_dim": 128, "dim_head": 16,
        "batch_size": 64, "augment": False,
    },
}

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
