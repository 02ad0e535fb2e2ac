"""Reference measurements around a :class:`~keepgym.envs.patch_select_env.PatchSelectEnv` run (AgentViT).

* :func:`train_all_patches`: the full-patch ViT of a joint run, trained with the same settings (same
  initialisation, Adam settings, data order and augmentation) and no agent: the baseline AgentViT's
  speed-up and accuracy are measured against.
* :func:`side_by_side`: several evaluations called in interleaved rounds, so drifts in machine load hit
  all of them alike (accuracy from the first round, median images/s).
* :func:`report_block`: an env ``evaluate`` result as a report block, MACs = forward + scoring pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from keepgym.envs.data import BatchLoader
from keepgym.envs.metrics import synchronize

__all__ = ["report_block", "side_by_side", "train_all_patches"]


def train_all_patches(env: Any, epochs: int, seed: int, progress: bool = True, desc: str = "full-patch ViT") -> float:
    """Train ``env``'s ViT on all patches for ``epochs`` epochs, as the joint run would without an agent.

    ``env`` (a ``PatchSelectEnv`` built with the joint run's settings and ``warmup_epochs=0``) is reset
    with the run's ``seed``, which builds the ViT exactly as the joint run's first reset did and seeds
    its data stream; the loop then trains that ViT with a new Adam of the env's learning rate on the
    same batches (a loader started from the env's data-order state) and skips the scoring pass an agent
    needs. Afterwards ``env.vit`` is the trained ViT and ``env.evaluate`` scores it.

    Args:
        env: The env whose ViT is trained.
        epochs: Epochs (the joint run's warm-up epochs included).
        seed: The joint run's seed.
        progress: Show a progress bar.
        desc: Its label.

    Returns:
        The loop's wall time in seconds (data, forward, backward, optimiser), as the joint run's is that
        of the agent's ``learn`` loop.
    """
    from tqdm.auto import tqdm

    env.reset(seed=seed)
    vit, device, data = env.vit, env.device, env.data
    opt = torch.optim.Adam(vit.parameters(), lr=env.learning_rate, fused=device.type in ("cpu", "cuda"))
    generator = torch.Generator()
    generator.set_state(env.state_dict()["epoch_data_generator"])
    loader = BatchLoader(
        data.train_x,
        data.train_y,
        data,
        env.batch_size,
        shuffle=True,
        augment=env.augment,
        drop_last=True,
        device=device,
        generator=generator,
    )
    bar = tqdm(total=epochs * len(loader), desc=desc, unit="step", disable=not progress)
    vit.train()
    synchronize(device)
    start = time.perf_counter()
    try:
        for _ in range(epochs):
            for xb, yb in loader:
                loss = F.cross_entropy(vit(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        synchronize(device)
    finally:
        bar.close()
    return time.perf_counter() - start


def side_by_side(runs: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, float]]:
    """Call every entry of ``runs`` in ``rounds`` interleaved rounds.

    Returns:
        Per name, the first round's result with ``images_per_second`` replaced by the median over rounds.
    """
    results: dict[str, dict[str, float]] = {}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for rnd in range(rounds):
        for name, fn in runs.items():
            r = fn()
            if rnd == 0:
                results[name] = r
            speeds[name].append(r["images_per_second"])
    for name, values in speeds.items():
        results[name]["images_per_second"] = float(np.median(values))
    return results


def report_block(result: dict[str, float], score_macs: bool = True) -> dict[str, float]:
    """An env ``evaluate`` result as a report block: ``macs_per_image`` = forward + scoring pass.

    Args:
        result: ``PatchSelectEnv.evaluate``/``evaluate_policy``'s result.
        score_macs: Count the scoring pass (False for selectors that need no scores, e.g. random-k).
    """
    score = result["score_macs_per_image"] if score_macs else 0.0
    return {
        "accuracy": result["accuracy"],
        "macs_per_image": result["macs_per_image"] + score,
        "forward_macs_per_image": result["macs_per_image"],
        "score_macs_per_image": score,
        "images_per_second": result["images_per_second"],
        "kept_patches": result["kept_patches"],
    }
