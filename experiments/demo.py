"""``keepgym demo``: both methods end to end, offline, on CPU, with a report a person can read.

1. **RL-Pruner**: trains the small CNN baseline (VGG-11 at width 0.25) on ``digits``, compresses
   it to 50 % channel sparsity with RL-Pruner and knowledge distillation, and compares with the
   ``uniform`` and ``global`` baselines at the same sparsity, stage size and KD budget.
2. **AgentViT**: trains the small ViT on ``digits`` while the DDQN patch agent learns which
   patches to keep, and compares with a full-patch ViT trained the same way, random-k and
   attention-top-k at the same number of kept patches.
3. Writes ``OUT/report.md`` (one table per method, ratios against the baseline), PNG figures in
   ``OUT/figures/`` (learned layer distribution and per-layer sparsity, accuracy vs MACs, example
   images with their kept patches), ``OUT/summary.json`` and TensorBoard events in every sub-run
   (``tensorboard --logdir OUT``), and prints the tables.

Every figure carries the run id of the report in its PNG metadata (``keepgym-run``), so a figure
left over from an earlier run cannot pass for this one.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keepgym.experiments.common import CliError, arg, prepare_run_dir, resolve_device, write_json

__all__ = ["DemoConfig", "run", "COMMAND", "DESCRIPTION", "Config"]

logger = logging.getLogger(__name__)

COMMAND = "demo"
DESCRIPTION = "Offline demo of both methods on digits (CPU, a few minutes): tables, figures, report.md."
PRUNE_METHODS = ("rlpruner", "uniform", "global")


@dataclass
class DemoConfig:
    """Settings of ``keepgym demo`` (defaults: the full demo; ``--quick``: a seconds-long smoke run)."""

    out: str = arg("runs/demo", help="run folder")
    seed: int = arg(0, help="random seed of every part")
    quick: bool = arg(False, help="tiny sizes (a smoke test in seconds; the figures mean nothing)")
    cnn_epochs: int = arg(15, help="baseline CNN training epochs")
    sparsity: float = arg(0.5, help="target channel sparsity of the compression")
    stage_sparsity: float = arg(0.1, help="channels removed per stage (fraction of the original)")
    sample_num: int = arg(6, help="RL-Pruner candidates per round (K)")
    rounds_per_stage: int = arg(3, help="RL-Pruner rounds per stage (E)")
    finetune_epochs: int = arg(1, help="KD epochs after every stage")
    final_finetune_epochs: int = arg(4, help="KD epochs after the last stage")
    vit_epochs: int = arg(12, help="ViT training epochs (joint with the agent; same for the full-patch ViT)")
    device: str = arg("cpu", help="cpu, cuda or auto")
    force: bool = arg(False, help="overwrite an existing run folder")
    progress: bool = arg(True, help="show progress bars")


Config = DemoConfig


def _quick(cfg: DemoConfig) -> DemoConfig:
    return dataclasses.replace(
        cfg,
        cnn_epochs=1,
        stage_sparsity=0.25,
        sample_num=2,
        rounds_per_stage=1,
        finetune_epochs=0,
        final_finetune_epochs=1,
        vit_epochs=2,
    )


def validate(cfg: DemoConfig) -> None:
    """Check the settings before any work starts."""
    checks = [
        (0 < cfg.sparsity < 1, f"--sparsity must be in (0, 1), got {cfg.sparsity}"),
        (0 < cfg.stage_sparsity <= cfg.sparsity, "--stage-sparsity must be in (0, --sparsity]"),
        (cfg.cnn_epochs >= 1 and cfg.vit_epochs >= 2, "--cnn-epochs must be >= 1 and --vit-epochs >= 2"),
        (cfg.sample_num >= 1 and cfg.rounds_per_stage >= 1, "--sample-num and --rounds-per-stage must be >= 1"),
        (cfg.finetune_epochs >= 0 and cfg.final_finetune_epochs >= 0, "fine-tune epochs must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CliError(msg)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _train_baseline(cfg: DemoConfig, out: Path) -> dict:
    from keepgym.experiments.train import TrainConfig
    from keepgym.experiments.train import run as train

    return train(
        TrainConfig(
            model="vgg11",
            dataset="digits",
            width_mult=0.25,
            epochs=cfg.cnn_epochs,
            out=str(out / "baseline"),
            seed=cfg.seed,
            device=cfg.device,
            force=True,
            progress=cfg.progress,
            train_size=300 if cfg.quick else None,
        )
    )


def _compress(cfg: DemoConfig, out: Path, algo: str) -> dict:
    from keepgym.experiments.prune import PruneConfig, compress

    return compress(
        PruneConfig(
            sparsity=cfg.sparsity,
            model="vgg11",
            dataset="digits",
            width_mult=0.25,
            checkpoint=str(out / "baseline" / "model.pt"),
            out=str(out / f"prune_{algo}"),
            algo=algo,
            stage_sparsity=cfg.stage_sparsity,
            sample_num=cfg.sample_num,
            rounds_per_stage=cfg.rounds_per_stage,
            finetune_epochs=cfg.finetune_epochs,
            final_finetune_epochs=cfg.final_finetune_epochs,
            latency_repeats=3 if cfg.quick else 20,
            seed=cfg.seed,
            device=cfg.device,
            force=True,
            progress=cfg.progress,
        )
    )


def _agentvit(cfg: DemoConfig, out: Path) -> dict:
    from keepgym.experiments.agentvit import AgentViTConfig, train_agentvit

    return train_agentvit(
        AgentViTConfig(
            dataset="digits",
            out=str(out / "agentvit"),
            epochs=cfg.vit_epochs,
            preset="vit_tiny" if cfg.quick else "vit_small",
            batch_size=64,
            augment=False,
            baseline=True,
            seed=cfg.seed,
            device=cfg.device,
            force=True,
            progress=cfg.progress,
            train_size=300 if cfg.quick else None,
            test_size=100 if cfg.quick else None,
            speed_rounds=1 if cfg.quick else 3,
        )
    )


def _stamp(src: Path, dst: Path, run_id: str) -> Path:
    """Copy a PNG into the report's figures, tagging it with the run id."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("keepgym-run", run_id)
    with Image.open(src) as img:
        img.save(dst, pnginfo=meta)
    return dst


def _accuracy_vs_macs(prune: dict, vit: dict, path: Path, run_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = prune["rlpruner"]["baseline"]
    ax1.scatter(base["macs"] / 1e6, 100 * base["test_accuracy"], s=80, marker="*", color="black", label="baseline")
    for (name, s), c in zip(prune.items(), ("tab:red", "tab:blue", "tab:green"), strict=False):
        ax1.scatter(s["final"]["macs"] / 1e6, 100 * s["final"]["test_accuracy"], s=60, color=c, label=name)
    ax1.set_xlabel("MACs per image (M)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title(f"VGG-11 (w 0.25) on digits, {int(100 * prune['rlpruner']['sparsity_target'])} % channels removed")
    ax1.legend()
    for name, c, m in (
        ("full", "black", "*"),
        ("agent", "tab:red", "o"),
        ("random", "tab:blue", "s"),
        ("topk", "tab:green", "^"),
    ):
        b = vit[name]
        ax2.scatter(
            b["macs_per_image"] / 1e6,
            100 * b["test_accuracy"],
            s=70,
            color=c,
            marker=m,
            label=f"{name} ({b['kept_patches']:.1f} patches)",
        )
    ax2.set_xlabel("MACs per image (M)")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("ViT on digits: patch selection")
    ax2.legend()
    fig.suptitle("Accuracy vs compute (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"keepgym-run": run_id})
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _prune_table(prune: dict) -> str:
    base = prune["rlpruner"]["baseline"]
    head = (
        "| method | test acc % | val acc % | MACs (M) | params (M) | MACs kept | params kept "
        "| latency b1 ms | latency b64 ms | speed-up b64 |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| baseline (unpruned) | {_pct(base['test_accuracy'])} | {_pct(base['val_accuracy'])} | "
        f"{base['macs'] / 1e6:.2f} | {base['params'] / 1e6:.3f} | 1.000 | 1.000 | "
        f"{_num(base.get('latency_ms_b1'))} | {_num(base.get('latency_ms_b64'))} | 1.00x |"
    ]
    for name, s in prune.items():
        f, b = s["final"], s["baseline"]
        rows.append(
            f"| {name} | {_pct(f['test_accuracy'])} | {_pct(f['val_accuracy'])} | {f['macs'] / 1e6:.2f} | "
            f"{f['params'] / 1e6:.3f} | {f['macs'] / b['macs']:.3f} | {f['params'] / b['params']:.3f} | "
            f"{_num(f.get('latency_ms_b1'))} | {_num(f.get('latency_ms_b64'))} | {_num(s.get('speedup_b64'))}x |"
        )
    return head + "\n".join(rows) + "\n"


def _vit_table(vit: dict) -> str:
    head = (
        "| ViT / patches | test acc % | kept patches | MACs/image (M) | MACs kept | images/s | train s |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    full = vit["full"]
    rows = []
    labels = {
        "full": "full-patch ViT (trained without agent)",
        "agent": "AgentViT: agent's patches",
        "random": "AgentViT ViT, random-k",
        "topk": "AgentViT ViT, attention top-k",
        "joint_full": "AgentViT ViT, all patches",
    }
    for name in ("full", "agent", "random", "topk", "joint_full"):
        if name not in vit:
            continue
        b = vit[name]
        train_s = b.get("train_seconds")
        rows.append(
            f"| {labels[name]} | {_pct(b['test_accuracy'])} | {b['kept_patches']:.1f} | "
            f"{b['macs_per_image'] / 1e6:.2f} | {b['macs_per_image'] / full['macs_per_image']:.3f} | "
            f"{b['images_per_second']:.0f} | {_num(train_s, '.1f')} |"
        )
    return head + "\n".join(rows) + "\n"


def run(cfg: DemoConfig) -> dict:
    """Run the demo; returns the summary written to ``OUT/summary.json``."""
    validate(cfg)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    if cfg.quick:
        cfg = _quick(cfg)
    out = prepare_run_dir(cfg.out, force=cfg.force)
    figures = out / "figures"
    figures.mkdir()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    write_json(out / "config.json", {**dataclasses.asdict(cfg), "run_id": run_id})
    start = time.perf_counter()
    timings: dict[str, float] = {}

    _say("[1/3] RL-Pruner: training the VGG-11 (width 0.25) baseline on digits ...")
    t = time.perf_counter()
    base = _train_baseline(cfg, out)
    timings["cnn_baseline"] = time.perf_counter() - t
    _say(f"      baseline test accuracy {100 * base['test_accuracy']:.2f} %, {base['macs'] / 1e6:.2f}M MACs")
    prune: dict[str, Any] = {}
    for algo in PRUNE_METHODS:
        _say(f"      compressing to {int(100 * cfg.sparsity)} % channel sparsity with {algo} ...")
        t = time.perf_counter()
        prune[algo] = _compress(cfg, out, algo)
        prune[algo]["sparsity_target"] = cfg.sparsity
        timings[f"prune_{algo}"] = time.perf_counter() - t

    _say("[2/3] AgentViT: training the ViT with the DDQN patch agent, and a full-patch ViT ...")
    t = time.perf_counter()
    vit = _agentvit(cfg, out)
    timings["agentvit"] = time.perf_counter() - t

    _say("[3/3] report ...")
    policy = _stamp(out / "prune_rlpruner" / "policy.png", figures / "policy.png", run_id)
    patches = _stamp(out / "agentvit" / "patches.png", figures / "patches.png", run_id)
    acc_macs = figures / "accuracy_vs_macs.png"
    _accuracy_vs_macs(prune, vit, acc_macs, run_id)
    prune_table, vit_table = _prune_table(prune), _vit_table(vit)
    total = time.perf_counter() - start
    report = _report(cfg, run_id, prune_table, vit_table, prune, vit, total, [policy, acc_macs, patches], out)
    (out / "report.md").write_text(report)
    summary = {
        "run_id": run_id,
        "wall_seconds": total,
        "timings": timings,
        "baseline": base,
        "prune": prune,
        "agentvit": vit,
    }
    write_json(out / "summary.json", summary)
    _say("\nRL-Pruner on digits (VGG-11, width 0.25):\n" + prune_table)
    _say("AgentViT on digits:\n" + vit_table)
    _say(f"demo finished in {total / 60:.1f} min; report: {out / 'report.md'}; TensorBoard: tensorboard --logdir {out}")
    return summary


def _report(cfg, run_id, prune_table, vit_table, prune, vit, total, figs, out) -> str:
    rl, uni = prune["rlpruner"]["final"], prune["uniform"]["final"]
    rel = [f.relative_to(out).as_posix() for f in figs]
    agent, topk, rnd = vit["agent"], vit["topk"], vit["random"]
    return f"""# keepgym demo report

Run id: `{run_id}` · wall time {total / 60:.1f} min · device {cfg.device} · seed {cfg.seed}
{"· **quick mode: tiny sizes, the numbers mean nothing**" if cfg.quick else ""}

Produced by `keepgym demo --out {cfg.out}` (`make demo`). Accuracies are on the test split, which no
reward, checkpoint choice or early stop looked at; MACs are per image; latencies were measured side
by side in the same process (median of repeats). TensorBoard: `tensorboard --logdir {cfg.out}`.

## RL-Pruner: VGG-11 (width 0.25) on digits, {int(100 * cfg.sparsity)} % of channels removed

Stages of {int(100 * cfg.stage_sparsity)} %, RL-Pruner with K={cfg.sample_num} candidates x E={cfg.rounds_per_stage}
rounds per stage, KD for {cfg.finetune_epochs} epoch(s) after every stage and {cfg.final_finetune_epochs} at the end,
the same for every method. `uniform` removes the same fraction from every layer group; `global` ranks
all channels together by Taylor importance (Torch-Pruning's global pruning).

{prune_table}
RL-Pruner vs uniform: {100 * (rl["test_accuracy"] - uni["test_accuracy"]):+.2f} points of test accuracy at
{rl["macs"] / 1e6:.2f}M vs {uni["macs"] / 1e6:.2f}M MACs.

![learned layer distribution]({rel[0]})

*The learned pruning distribution over the layer groups (left) and the resulting sparsity of each
group (right) for the RL-Pruner run.*

## AgentViT: ViT on digits

Agent and ViT trained together for {cfg.vit_epochs} epochs (the first on all patches); random-k and top-k
use the same jointly trained ViT and keep as many patches per image as the agent did on average
({agent["kept_patches"]:.1f}). The full-patch ViT was trained from the same seed with all patches.

{vit_table}
Agent vs attention top-k: {100 * (agent["test_accuracy"] - topk["test_accuracy"]):+.2f} points; agent vs
random-k: {100 * (agent["test_accuracy"] - rnd["test_accuracy"]):+.2f} points.

![accuracy vs MACs]({rel[1]})

*Test accuracy against MACs per image for every method of both parts.*

![kept patches]({rel[2]})

*Example test images with the patches the agent kept highlighted.*
"""
