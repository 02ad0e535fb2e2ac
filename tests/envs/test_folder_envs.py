"""Every env id reads an image folder: ``dataset="folder", data_root=DIR`` (tiny generated images)."""

import gymnasium as gym
import numpy as np
import pytest

import keepgym  # noqa: F401  (registers the ids)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (20, 24, 3)) + 80 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_prune_env_id_on_an_image_folder_with_a_macs_target(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPGYM_CACHE", str(tmp_path))
    env = gym.make(
        "RLPrune-VGG19-v0", dataset="folder", data_root=str(image_folder), image_size=16, val_size=6,
        pretrained=False, width_mult=0.0625, target_macs=0.6, stage_sparsity=0.4, calibration_size=8,
        disable_env_checker=True,
    )  # fmt: skip
    raw = env.unwrapped
    assert raw.data.classes == ("class0", "class1", "class2") and raw.input_size == (1, 3, 16, 16)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(np.ones(raw.num_groups, dtype=np.float32))
    assert terminated and info["macs_ratio"] <= 0.6


def test_patch_select_env_id_on_an_image_folder(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPGYM_CACHE", str(tmp_path))
    env = gym.make(
        "PatchSelect-Digits-v0", dataset="folder", data_root=str(image_folder), image_size=16, patch_size=4,
        val_size=6, batch_size=8, warmup_epochs=0, disable_env_checker=True,
    )  # fmt: skip
    obs, _ = env.reset(seed=0)
    assert obs.shape == (16,)  # (16 / 4) ** 2 patches
    _, reward, _, _, _ = env.step(env.action_space.sample())
    assert np.isfinite(reward)


def test_prune_env_rebuilds_the_image_size_the_baseline_was_trained_at(image_folder, tmp_path, monkeypatch):
    """A baseline trained with ``--image-size 16`` records it with its split; the env needs no repeat of it."""
    from keepgym.envs.data import load_dataset
    from keepgym.envs.prune_env import PruneEnv
    from keepgym.envs.splits import split_record
    from keepgym.models import create_model, save_model

    monkeypatch.setenv("KEEPGYM_CACHE", str(tmp_path))
    data = load_dataset("folder", str(image_folder), image_size=16, val_size=6, seed=0)
    model = create_model("vgg11", data.num_classes, 0.0625, data.in_chans)
    save_model(model, tmp_path / "base.pt", split=split_record(data, seed=0, val_size=6, train_size=None))
    env = PruneEnv(model_name="vgg11", dataset="folder", data_root=str(image_folder), checkpoint=tmp_path / "base.pt",
                   target_sparsity=0.2, stage_sparsity=0.2, calibration_size=8)  # fmt: skip
    assert env.input_size == (1, 3, 16, 16)
    assert env.data.val_y.tolist() == data.val_y.tolist()
