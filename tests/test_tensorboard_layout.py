"""One TensorBoard layout for `keepgym prune`, `keepgym agentvit` and the Python API (README's tag table).

Every run writes ``<run folder>/tb/<algo>_1/`` (the training events) with the same tags whichever way it was
started: scalars, histograms, images, the config as text and as HParams.
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

import keepgym  # noqa: F401 - registers the env ids
from keepgym.agents import DDQN, RLPruner
from keepgym.agents.callbacks import EnvInfoCallback, PatchEpochCallback, read_tensorboard
from keepgym.experiments.cli import main
from keepgym.models import create_model, save_model

# The README's table, per kind of run.
PRUNE_SCALARS = {
    "stage/reward", "stage/accuracy", "stage/macs_ratio", "stage/params_ratio", "stage/sparsity",
    "stage/epsilon", "stage/search_seconds", "stage/candidates",
    "env/accuracy", "env/macs_ratio", "env/params_ratio", "env/sparsity",
    "env/final_accuracy", "env/final_macs_ratio", "env/final_params_ratio",
}  # fmt: skip
PRUNE_HISTOGRAMS = {"stage/distribution", "stage/action", "env/widths", "env/group_sparsity"}
PRUNE_IMAGES = {"stage/distribution_image", "env/group_sparsity_image"}
PATCH_SCALARS = {
    "env/loss", "env/kept", "epoch/train_loss", "epoch/kept_patches", "epoch/images_per_second",
    "epoch/exploration_rate", "eval/val_accuracy_agent", "eval/val_accuracy_full", "eval/val_kept_patches",
}  # fmt: skip
PATCH_IMAGES = {"epoch/kept_patches_image"}
# The config as text, and as TensorBoard hparams (HParams tab).
TENSORS = {"config/text_summary"}
HPARAMS = {"_hparams_/experiment", "_hparams_/session_start_info"}


def _tags(run_dir, name):
    """Tags of ``run_dir/tb/<name>_1``, the one training-events folder of a run (hparams as ``hparams``)."""
    folders = sorted(p.name for p in (run_dir / "tb").iterdir() if not p.name.endswith("_final"))
    assert folders == [f"{name}_1"], folders
    accumulator = read_tensorboard(run_dir / "tb" / f"{name}_1")
    return {**accumulator.Tags(), "hparams": accumulator.PluginTagToContent("hparams")}


def _assert_has(tags, scalars, histograms, images):
    assert scalars <= set(tags["scalars"]), scalars - set(tags["scalars"])
    assert histograms <= set(tags["histograms"]), histograms - set(tags["histograms"])
    assert images <= set(tags["images"]), images - set(tags["images"])
    assert TENSORS <= set(tags["tensors"]), TENSORS - set(tags["tensors"])
    assert HPARAMS <= set(tags["hparams"]), HPARAMS - set(tags["hparams"])


def test_prune_cli_and_python_api_share_the_layout(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "base.pt"
    save_model(create_model("vgg11", num_classes=10, width_mult=0.125, in_chans=1), checkpoint)
    out = tmp_path / "cli"
    argv = [
        "prune", "--model", "vgg11", "--dataset", "digits", "--checkpoint", str(checkpoint),
        "--sparsity", "0.5", "--stage-sparsity", "0.25", "--sample-num", "2", "--rounds-per-stage", "1",
        "--finetune-epochs", "0", "--final-finetune-epochs", "1", "--calibration-size", "32",
        "--latency-repeats", "1", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    cli_tags = _tags(out, "rlpruner")
    _assert_has(cli_tags, PRUNE_SCALARS, PRUNE_HISTOGRAMS, PRUNE_IMAGES)
    assert (out / "tb" / "rlpruner_final").is_dir()  # baseline/* and final/* once, beside the run

    env = gym.make(
        "RLPrune-Digits-v0", checkpoint=str(checkpoint), width_mult=0.125, target_sparsity=0.5,
        stage_sparsity=0.25, calibration_size=32,
    )  # fmt: skip
    py = tmp_path / "python"
    agent = RLPruner("MlpPolicy", env, sample_num=2, rounds_per_stage=1, tensorboard_log=str(py / "tb"), seed=0)
    agent.learn(env.unwrapped.num_stages, callback=EnvInfoCallback(), progress_bar=True)
    py_tags = _tags(py, "RLPruner")
    _assert_has(py_tags, PRUNE_SCALARS, PRUNE_HISTOGRAMS, PRUNE_IMAGES)
    # The hparams hold the search settings, so runs can be compared on K / E / alpha / beta.
    meta = py_tags["hparams"]["_hparams_/session_start_info"]
    for name in (b"sample_num", b"rounds_per_stage", b"env_kwargs.target_sparsity"):
        assert name in meta, name


def test_agentvit_cli_and_python_api_share_the_layout(tmp_path):
    out = tmp_path / "cli"
    argv = [
        "agentvit", "--dataset", "digits", "--preset", "vit_tiny", "--train-size", "128", "--test-size", "64",
        "--batch-size", "32", "--epochs", "3", "--warmup-epochs", "1", "--speed-rounds", "1", "--examples", "2",
        "--device", "cpu", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    _assert_has(_tags(out, "agentvit"), PATCH_SCALARS, set(), PATCH_IMAGES)
    assert (out / "tb" / "agentvit_final").is_dir()

    env = gym.make("PatchSelect-Digits-v0", train_size=128, batch_size=32, warmup_epochs=0)
    py = tmp_path / "python"
    agent = DDQN("MlpPolicy", env, learning_starts=4, tensorboard_log=str(py / "tb"), seed=0)
    callback = PatchEpochCallback(num_images=3)
    agent.learn(2 * env.unwrapped.steps_per_epoch, callback=[EnvInfoCallback(), callback], progress_bar=True)
    _assert_has(_tags(py, "DDQN"), PATCH_SCALARS, set(), PATCH_IMAGES)
    assert callback.epochs_logged == 2
    image = read_tensorboard(py / "tb" / "DDQN_1").Images("epoch/kept_patches_image")[-1]
    assert image.width > image.height > 0  # three images side by side, two rows


@pytest.mark.parametrize("bad", [-1])
def test_patch_epoch_callback_refuses_a_negative_image_count(bad):
    with pytest.raises(ValueError, match="num_images"):
        PatchEpochCallback(num_images=bad)
