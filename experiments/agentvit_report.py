"""The reports of an AgentViT run: the final side-by-side test report, ``patches.png`` and ``keepgym evaluate --vit``.

Every figure comes from the env's own evaluation (``PatchSelectEnv.evaluate``/``evaluate_policy``), timed
side by side (:func:`keepgym.envs.vit_training.side_by_side`); this module only chooses what to compare
and lays it out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from keepgym.agents.patch_agents import load_patch_agent
from keepgym.envs.data import DATASETS, load_dataset
from keepgym.envs.vit_training import report_block, side_by_side
from keepgym.experiments.common import CliError, resolve_device, write_json
from keepgym.experiments.plots import plot_kept_patches
from keepgym.models.vit import select_random_k, select_topk

__all__ = ["BLOCKS", "evaluate_agentvit", "final_report", "format_summary", "patches_figure"]

#: The report's blocks: the full-patch ViT, the agent's patches, random-k, attention top-k, the joint ViT on all.
BLOCKS = ("full", "agent", "random", "topk", "joint_full")


def final_report(
    env: Any,
    agent: Any,
    base_env: Any | None = None,
    base_seconds: float = 0.0,
    seed: int = 0,
    speed_rounds: int = 3,
) -> dict[str, Any]:
    """The five blocks on the test split, side by side, plus validation accuracies.

    ``k`` is the agent's own mean number of kept patches on the test split; random-k and top-k keep
    ``k`` patches per image. ``full`` is ``base_env``'s ViT (the full-patch baseline) when given, else the
    joint ViT on all patches.

    Args:
        env: The joint run's ``PatchSelectEnv`` (its ViT trained with the agent).
        agent: The agent.
        base_env: The env whose ViT is the full-patch baseline (:func:`keepgym.envs.vit_training.train_all_patches`).
        base_seconds: The baseline's training time.
        seed: Seeds the random-k patches (the same in every round).
        speed_rounds: Interleaved rounds of the images/s measurement.
    """
    bs = env.batch_size
    agent_test = env.evaluate_policy(agent, "test")
    k = max(1, min(env.num_patches, int(round(agent_test["kept_patches"]))))
    gen = torch.Generator(device=env.device if env.device.type == "cuda" else torch.device("cpu"))

    def random_k(split: str) -> dict[str, float]:
        gen.manual_seed(seed + 12345)  # the same random patches in every round
        return env.evaluate(lambda s: select_random_k(s, k, gen), split, bs, needs_scores=False)

    runs: dict[str, Callable[[], dict[str, float]]] = {
        "joint_full": lambda: env.evaluate(None, "test", bs),
        "agent": lambda: env.evaluate_policy(agent, "test"),
        "random": lambda: random_k("test"),
        "topk": lambda: env.evaluate(lambda s: select_topk(s, k), "test", bs),
    }
    if base_env is not None:
        runs["full"] = lambda: base_env.evaluate(None, "test", bs)
    raw = side_by_side(runs, speed_rounds)
    results = {name: report_block(r, score_macs=name != "random") for name, r in raw.items()}
    if base_env is None:
        results["full"] = dict(results["joint_full"])
    who = "the agent per image" if env.action_mode == "patches" else "the agent per batch"
    descriptions = {
        "full": "baseline ViT (trained on all patches, no agent), all patches"
        if base_env is not None
        else "joint ViT, all patches (no --baseline)",
        "joint_full": "joint ViT, all patches",
        "agent": f"joint ViT, patches chosen by {who}",
        "random": f"joint ViT, {k} random patches per image",
        "topk": f"joint ViT, the {k} most attended patches per image (block {env.state_layer})",
    }
    summary: dict[str, Any] = {}
    for name in BLOCKS:
        r = results[name]
        summary[name] = {
            "vit": descriptions[name],
            "test_accuracy": r["accuracy"],
            "macs_per_image": r["macs_per_image"],
            "forward_macs_per_image": r["forward_macs_per_image"],
            "score_macs_per_image": r["score_macs_per_image"],
            "images_per_second": r["images_per_second"],
            "kept_patches": r["kept_patches"],
        }
    summary["agent"]["val_accuracy"] = env.evaluate_policy(agent, "val")["accuracy"]
    summary["joint_full"]["val_accuracy"] = env.evaluate(None, "val", bs)["accuracy"]
    summary["topk"]["val_accuracy"] = env.evaluate(lambda s: select_topk(s, k), "val", bs)["accuracy"]
    summary["random"]["val_accuracy"] = random_k("val")["accuracy"]
    if base_env is not None:
        summary["full"]["val_accuracy"] = base_env.evaluate(None, "val", bs)["accuracy"]
        summary["full"]["train_seconds"] = base_seconds
    else:
        summary["full"]["val_accuracy"] = summary["joint_full"]["val_accuracy"]
    summary["k"] = k
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the table ``keepgym agentvit`` prints."""
    lines = [f"{'block':<11} {'test acc':>8} {'kept':>6} {'MMACs/img':>10} {'img/s':>9}  vit"]
    for name in BLOCKS:
        b = summary[name]
        lines.append(
            f"{name:<11} {100 * b['test_accuracy']:7.2f}% {b['kept_patches']:6.1f} "
            f"{b['macs_per_image'] / 1e6:10.3f} {b['images_per_second']:9.1f}  {b['vit']}"
        )
    line = f"train seconds: agentvit {summary['agent']['train_seconds']:.1f}"
    if "train_seconds" in summary["full"]:
        line += f", full-patch baseline {summary['full']['train_seconds']:.1f} (x{summary['speedup_train']:.2f})"
    lines.append(line)
    return "\n".join(lines)


@torch.no_grad()
def patches_figure(path: Path, env: Any, agent: Any, k: int, examples: int = 8, title: str = "") -> Path:
    """``patches.png``: test images, the patches the agent keeps, and the attention top-``k`` per image."""
    vit = env.vit
    x_u8, y = env.data.split("test")
    x_u8, y = x_u8[: env.batch_size], y[: env.batch_size]
    xb = env.data.normalize(x_u8.to(env.device))
    vit.eval()
    try:
        scores = vit.patch_scores(xb, layer=env.state_layer, mode=env.state)
        rows = []
        for name, keep in (
            ("agent keeps", env.choose_patches(agent, xb)),
            (f"attention top-{k}", select_topk(scores, max(1, min(k, vit.num_patches)))),
        ):
            if keep is None:
                keep = torch.arange(vit.num_patches, device=xb.device)
            if keep.dim() == 1:
                keep = keep.unsqueeze(0).expand(len(xb), -1)
            preds = vit(xb, keep=keep).argmax(1).cpu()
            rows.append((name, keep.cpu()[:examples].tolist(), preds[:examples].tolist()))
    finally:
        vit.train()
    m = min(examples, len(xb))
    return plot_kept_patches(path, x_u8[:m].numpy(), y[:m].tolist(), rows, int(vit.patch_size), title)


def evaluate_agentvit(cfg: Any) -> dict[str, Any]:
    """``keepgym evaluate --vit VIT --agent AGENT``: the agent selects patches at inference time.

    The data split is rebuilt from the settings stored in ``vit.pt`` (seed, sizes) so it is the one the
    ViT was trained and validated on; ``--dataset`` must name the same dataset.

    Args:
        cfg: ``keepgym.experiments.evaluate.EvaluateConfig`` (``vit``, ``agent``, ``dataset``, ``split``,
            ``batch_size``, ``device``, ``out``, ``data_root``).

    Returns:
        ``{"agent": {...}, "full": {...}, ...}`` with accuracy, MACs, images/s and kept patches.
    """
    from keepgym.envs.patch_select_env import PatchSelectEnv
    from keepgym.models import load_model_with_extra

    if cfg.agent is None:
        raise CliError("--vit needs --agent AGENT.zip (saved by `keepgym agentvit`)")
    if cfg.checkpoint is not None:
        raise CliError("give either --checkpoint (a CNN/ViT alone) or --vit with --agent, not both")
    for flag, path in (("--vit", cfg.vit), ("--agent", cfg.agent)):
        if not Path(path).is_file():
            raise CliError(f"{flag} {path}: no such file")
    if cfg.dataset is None or cfg.dataset not in DATASETS:
        raise CliError(f"--dataset is required; valid datasets: {', '.join(DATASETS)}")
    if cfg.split not in ("test", "val", "train"):
        raise CliError(f"unknown split {cfg.split!r}; valid splits: test, val, train")
    device = torch.device(resolve_device(cfg.device))
    vit, extra = load_model_with_extra(cfg.vit, map_location="cpu")
    sel, dset = extra.get("agentvit"), extra.get("data", {})
    if sel is None or not hasattr(vit, "patch_scores"):
        raise CliError(f"--vit {cfg.vit}: not a ViT saved by `keepgym agentvit` (no patch-selection settings)")
    if dset.get("dataset", cfg.dataset) != cfg.dataset:
        raise CliError(f"--vit {cfg.vit} was trained on {dset['dataset']}, not {cfg.dataset}")
    try:
        agent = load_patch_agent(sel["algo"], cfg.agent)
    except Exception as err:  # noqa: BLE001 - any unreadable zip is a user error here
        raise CliError(
            f"--agent {cfg.agent}: not a {sel['algo']} agent zip: {str(err).splitlines()[0][:200]}"
        ) from None
    data = load_dataset(
        cfg.dataset,
        cfg.data_root,
        val_size=dset.get("val_size", cfg.val_size),
        seed=dset.get("seed", cfg.seed),
        image_size=dset.get("image_size"),
        train_size=dset.get("train_size"),
        test_size=dset.get("test_size"),
    )
    # The env the agent acted in, around the saved ViT: its own evaluation applies the agent's choices.
    env = PatchSelectEnv(
        data=data,
        model=vit,
        batch_size=min(sel["batch_size"], len(data.train_y)),
        action_mode=sel["action_mode"],
        keep_ratios=sel["keep_ratios"],
        target_keep=sel.get("target_keep"),
        state=sel["state"],
        state_layer=sel["state_layer"],
        warmup_epochs=0,
        device=device,
    )
    if agent.observation_space != env.observation_space or agent.action_space != env.action_space:
        raise CliError(
            f"--agent {cfg.agent} does not fit this ViT: it observes {agent.observation_space.shape} "
            f"and acts in {agent.action_space}; the ViT needs {env.observation_space.shape} and {env.action_space}"
        )
    bs = sel["batch_size"]
    raw = side_by_side(
        {
            "full": lambda: env.evaluate(None, cfg.split, bs),
            "agent": lambda: env.evaluate_policy(agent, cfg.split, batch_size=bs),
        },
        rounds=2,
    )
    results = {name: report_block(r) for name, r in raw.items()}
    print(f"{'patches':<8} {cfg.split + ' acc':>9} {'kept':>6} {'MMACs/img':>10} {'img/s':>9}")
    for name in ("full", "agent"):
        r = results[name]
        print(
            f"{name:<8} {100 * r['accuracy']:8.2f}% {r['kept_patches']:6.1f} "
            f"{r['macs_per_image'] / 1e6:10.3f} {r['images_per_second']:9.1f}"
        )
    result = {
        "vit": str(cfg.vit),
        "agent_path": str(cfg.agent),
        "dataset": cfg.dataset,
        "split": cfg.split,
        "device": str(device),
        **results,
    }
    if cfg.out:
        write_json(cfg.out, result)
    return result
