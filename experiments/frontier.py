"""``keepgym frontier``: test accuracy against MACs for RL-Pruner and the one-line heuristics, at equal cost.

The question a user brings to RL-Pruner is whether its learned layer allocation beats the simple rules
at the same compute. This command answers it on one trained baseline: every method prunes the same
model to the same MACs targets (``PruneEnv(target_macs=...)``: each stage removes the same fraction of
the original MACs, the episode ends when the target is met), with the same knowledge-distillation
budget (KD epochs after every stage and at the end, best validation epoch kept), over several seeds:

* ``rlpruner``: RL-Pruner's search over the layer distribution, Taylor importance inside a group;
* ``uniform``: every group gives the same fraction of its width, Taylor importance;
* ``global``: Torch-Pruning's global ranking of the (group-normalised) Taylor importance;
* ``tp``: Torch-Pruning's own default recipe, magnitude importance (group L2 norm, Torch-Pruning 1.6's
  ``GroupMagnitudeImportance(p=2)`` ranks a group's channels by the same sum of squares) with one
  pruning ratio for every layer (``global_pruning=False``): the ``uniform`` allocation with ``l2``;
* ``rlpruner-racing``, ``ppo``, ``sac``, ``ppo-v0`` (not run unless asked): RL-Pruner with
  ``--racing``; PPO and SAC on the ``log_prior`` action parameterisation (the ``-LogPrior`` ids) and PPO on the
  plain split weights (``-v0``), each given ``K x E`` episodes, i.e. as many evaluated allocations as
  RL-Pruner scores candidates;
* ``rlpruner-l2`` (not run unless asked): RL-Pruner's search with the ``l2`` criterion, which tells the
  allocation's effect apart from the criterion's.

Each run is one ``keepgym prune`` run folder (``OUT/runs/<method>_m<target>_s<seed>/``, resumable), and
the baseline is ``OUT/baseline/`` (a ``keepgym train`` run) unless ``--checkpoint`` names one. After
every run ``OUT/frontier.json`` (every raw figure, the per-method/target mean and std, the machine),
``OUT/frontier.md`` (the table) and ``OUT/frontier.png`` (accuracy against MACs with error bars) are
rewritten. Run the same command again to continue an interrupted frontier: finished runs are read back,
an interrupted one resumes from its last stage. Several processes may share one ``--out`` when they
run disjoint ``--methods`` or ``--seeds``.

Presets: ``--quick`` is sized for a 2-core CPU in under 45 minutes on CIFAR-10 (VGG-11 at width 0.25,
8,000 training images of which 800 held out for validation, 20 baseline epochs, MACs targets 0.7 / 0.5 /
0.35 in stages of 25 % of the original MACs, RL-Pruner K x E = 4 x 2, no KD between stages and 1 KD epoch
at the end, seeds 0 1 2, one torch thread). Without it, the full preset is RL-Pruner's protocol for a
GPU (VGG-19, all of CIFAR-10, 200 baseline epochs, stages of 5 % of the MACs, K x E = 10 x 10, 20 KD
epochs per stage and 100 at the end). Any flag given explicitly overrides the preset.

The quick preset reads CIFAR-10 from this project's shared tarball (``../shared/data/cifar10-jpeg.tar.gz``
beside the repository) when it is there; elsewhere give ``--dataset cifar10 --download`` or
``--dataset folder --data-root DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from keepgym.envs.data import DATASETS
from keepgym.experiments.common import CliError, arg, machine_info, write_json
from keepgym.experiments.frontier_methods import DEFAULT_METHODS, LABELS, METHOD_OPTIONS, METHODS
from keepgym.experiments.frontier_report import frontier_markdown, frontier_table, plot_frontier
from keepgym.models.serialization import atomic_write

__all__ = ["COMMAND", "DESCRIPTION", "Config", "FrontierConfig", "METHODS", "run", "resolve"]

logger = logging.getLogger(__name__)

COMMAND = "frontier"
DESCRIPTION = (
    "Accuracy vs MACs of RL-Pruner, uniform, global and Torch-Pruning's default recipe at equal MACs targets "
    "and KD budget, over seeds, from one baseline (--quick: CIFAR-10 on a 2-core CPU in < 45 min)."
)

#: The project's own copy of CIFAR-10 (JPEGs in ImageFolder layout), beside the repository.
SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"

QUICK = {
    "model": "vgg11",
    "width_mult": 0.25,
    "dataset": "folder",
    "train_size": 8000,
    "val_size": 0.1,
    "baseline_epochs": 20,
    "targets": (0.7, 0.5, 0.35),
    "stage_sparsity": 0.25,
    "sample_num": 4,
    "rounds_per_stage": 2,
    "finetune_epochs": 0,
    "final_finetune_epochs": 1,
    "seeds": (0, 1, 2),
    "threads": 1,
}
FULL = {
    "model": "vgg19",
    "width_mult": 1.0,
    "dataset": "cifar10",
    "train_size": None,
    "val_size": 0.1,
    "baseline_epochs": 200,
    "targets": (0.7, 0.5, 0.35),
    "stage_sparsity": 0.05,
    "sample_num": 10,
    "rounds_per_stage": 10,
    "finetune_epochs": 20,
    "final_finetune_epochs": 100,
    "seeds": (0, 1, 2),
    "threads": None,
}


@dataclass
class FrontierConfig:
    """Settings of one ``keepgym frontier`` (saved as ``OUT/config.json``); None = the preset's value."""

    out: str = arg("runs/frontier", help="folder of the baseline, the runs, frontier.json/.md/.png")
    quick: bool = arg(
        False,
        help="CPU preset, < 45 min on 2 cores: vgg11 width 0.25, CIFAR-10 8,000 train images (800 val), "
        "20 baseline epochs, MACs targets 0.7 0.5 0.35, stages of 0.25, K x E = 4 x 2, KD 0 epochs per stage "
        "+ 1 final, seeds 0 1 2, 1 thread (default: the full GPU preset: vgg19, all CIFAR-10, 200 epochs, "
        "stages of 0.05, K x E = 10 x 10, KD 20 per stage + 100 final)",
    )
    methods: tuple[str, ...] = arg(DEFAULT_METHODS, help=f"methods to run: {', '.join(METHODS)}")
    targets: tuple[float, ...] | None = arg(None, help="MACs targets, fractions of the baseline's MACs")
    seeds: tuple[int, ...] | None = arg(None, help="seeds of every method and target")
    model: str | None = arg(None, help="model of the baseline")
    width_mult: float | None = arg(None, help="channel width multiplier of the baseline")
    dataset: str | None = arg(None, help=f"dataset: {', '.join(DATASETS)}")
    data_root: str | None = arg(
        None, help="dataset folder; --dataset folder: an ImageFolder tree or .tar.gz of one (quick: shared CIFAR-10)"
    )
    download: bool = arg(False, help="download a missing torchvision dataset (needs internet)")
    train_size: int | None = arg(None, help="training images used, validation included (None: all)")
    val_size: float | None = arg(None, help="fraction of the training images held out for validation")
    checkpoint: str | None = arg(None, help="a trained baseline model.pt (default: train one into OUT/baseline)")
    baseline_epochs: int | None = arg(None, help="epochs of the baseline training")
    stage_sparsity: float | None = arg(None, help="fraction of the original MACs each stage removes")
    sample_num: int | None = arg(None, help="RL-Pruner: candidates per round (K)")
    rounds_per_stage: int | None = arg(None, help="RL-Pruner: rounds per stage (E)")
    finetune_epochs: int | None = arg(None, help="KD epochs after every stage (every method)")
    final_finetune_epochs: int | None = arg(None, help="KD epochs at the end (every method)")
    eval_size: int | None = arg(None, help="score RL-Pruner's candidates on this many validation images (None: all)")
    candidate_scoring: str = arg(
        "vanilla", help="RL-Pruner's candidate scoring (see keepgym prune)", choices=("vanilla", "adaptive_bn")
    )
    threads: int | None = arg(None, help="torch CPU threads (quick: 1, steadier on a shared machine)")
    device: str = arg("auto", help="cpu, cuda, cuda:N or auto")
    progress: bool = arg(True, help="show progress bars")


Config = FrontierConfig


def resolve(cfg: FrontierConfig) -> FrontierConfig:
    """Fill every unset field from the preset (``--quick`` or the full one) and check the result."""
    preset = QUICK if cfg.quick else FULL
    values = {k: (v if getattr(cfg, k, None) is None else getattr(cfg, k)) for k, v in preset.items()}
    cfg = dataclasses.replace(cfg, **values)
    if cfg.dataset == "folder" and cfg.data_root is None:
        if not (cfg.quick and SHARED_CIFAR10.is_file()):
            raise CliError(
                "--dataset folder needs --data-root DIR; without the project's shared CIFAR-10 tarball "
                f"({SHARED_CIFAR10}) give --dataset cifar10 --download"
            )
        cfg = dataclasses.replace(cfg, data_root=str(SHARED_CIFAR10))
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        raise CliError(f"unknown method(s) {', '.join(unknown) or '(none)'}; valid methods: {', '.join(METHODS)}")
    checks = [
        (cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}"),
        (bool(cfg.targets) and all(0 < t < 1 for t in cfg.targets), f"--targets must be in (0, 1), got {cfg.targets}"),
        (bool(cfg.seeds) and all(s >= 0 for s in cfg.seeds), f"--seeds must be >= 0, got {cfg.seeds}"),
        (
            0 < cfg.stage_sparsity <= 1 - max(cfg.targets),
            f"--stage-sparsity must be in (0, 1 - max(--targets)={1 - max(cfg.targets):g}], got {cfg.stage_sparsity}",
        ),
        (cfg.baseline_epochs >= 1, f"--baseline-epochs must be >= 1, got {cfg.baseline_epochs}"),
        (cfg.finetune_epochs >= 0, f"--finetune-epochs must be >= 0, got {cfg.finetune_epochs}"),
        (cfg.final_finetune_epochs >= 0, f"--final-finetune-epochs must be >= 0, got {cfg.final_finetune_epochs}"),
        (cfg.threads is None or cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}"),
        (cfg.checkpoint is None or Path(cfg.checkpoint).is_file(), f"--checkpoint {cfg.checkpoint}: no such file"),
    ]
    for ok, message in checks:
        if not ok:
            raise CliError(message)
    return cfg


# ------------------------------------------------------------------------------------------------ steps
def _baseline(cfg: FrontierConfig, out: Path) -> tuple[str, dict]:
    """The baseline's model file and its summary (trained into ``OUT/baseline`` unless given)."""
    if cfg.checkpoint is not None:
        return cfg.checkpoint, {"checkpoint": cfg.checkpoint}
    from keepgym.experiments import train

    folder = out / "baseline"
    if (folder / "summary.json").is_file():
        logger.info("baseline: reusing %s", folder)
        return str(folder / "model.pt"), json.loads((folder / "summary.json").read_text())
    summary = train.run(
        train.TrainConfig(
            model=cfg.model,
            dataset=cfg.dataset,
            out=str(folder),
            epochs=cfg.baseline_epochs,
            width_mult=cfg.width_mult,
            val_size=cfg.val_size,
            train_size=cfg.train_size,
            data_root=cfg.data_root,
            download=cfg.download,
            device=cfg.device,
            seed=0,
            resume=(folder / "config.json").is_file(),
            progress=cfg.progress,
        )
    )
    return str(folder / "model.pt"), summary


def _run_dir(out: Path, method: str, target: float, seed: int) -> Path:
    return out / "runs" / f"{method}_m{target:g}_s{seed}"


def _prune(cfg: FrontierConfig, checkpoint: str, method: str, target: float, seed: int, folder: Path) -> dict:
    from keepgym.experiments import prune

    algo, criterion = METHODS[method]
    sb3 = algo in ("ppo", "sac", "a2c")
    started = (folder / "config.json").is_file()
    return prune.compress(
        prune.PruneConfig(
            model=cfg.model,
            dataset=cfg.dataset,
            checkpoint=checkpoint,
            data_root=cfg.data_root,
            train_size=cfg.train_size,
            val_size=cfg.val_size,
            out=str(folder),
            target_macs=target,
            stage_sparsity=cfg.stage_sparsity,
            algo=algo,
            criterion=criterion,
            sample_num=cfg.sample_num,
            rounds_per_stage=cfg.rounds_per_stage,
            finetune_epochs=cfg.finetune_epochs,
            final_finetune_epochs=cfg.final_finetune_epochs,
            eval_size=cfg.eval_size,
            candidate_scoring=cfg.candidate_scoring,
            latency_repeats=0,
            device=cfg.device,
            seed=seed,
            resume=started and not sb3,  # an SB3 run cannot resume: it restarts
            force=started and sb3,
            episodes=cfg.sample_num * cfg.rounds_per_stage if sb3 else 1,
            progress=cfg.progress,
            **METHOD_OPTIONS.get(method, {}),
        )
    )


def _record(method: str, target: float, seed: int, summary: dict, folder: Path) -> dict:
    final, base = summary["final"], summary["baseline"]
    return {
        "method": method,
        "target_macs": target,
        "seed": seed,
        "test_accuracy": final["test_accuracy"],
        "val_accuracy": final["val_accuracy"],
        "macs": final["macs"],
        "params": final["params"],
        "macs_ratio": final["macs"] / base["macs"],
        "params_ratio": final["params"] / base["params"],
        "channel_sparsity": summary["sparsity"],
        "stages": summary["num_stages"],
        "evaluations": summary["evaluations"],
        "wall_seconds": summary["wall_seconds"],
        "baseline_test_accuracy": base["test_accuracy"],
        "run_dir": str(folder),
    }


def _collect(cfg: FrontierConfig, out: Path) -> list[dict]:
    """Every finished run under ``OUT/runs`` for this config's methods, targets and seeds."""
    records = []
    for seed in cfg.seeds:
        for target in cfg.targets:
            for method in METHODS:
                folder = _run_dir(out, method, target, seed)
                if (folder / "summary.json").is_file():
                    summary = json.loads((folder / "summary.json").read_text())
                    records.append(_record(method, target, seed, summary, folder))
    return records


def _write_outputs(cfg: FrontierConfig, out: Path, baseline: dict, started: float, errors: list[dict]) -> dict:
    records = _collect(cfg, out)
    methods = tuple(m for m in METHODS if any(r["method"] == m for r in records))
    rows = frontier_table(records, methods, cfg.targets)
    result = {
        "command": "keepgym frontier",
        "config": dataclasses.asdict(cfg),
        "machine": machine_info(),
        "baseline": baseline,
        "methods": {m: {"algo": METHODS[m][0], "criterion": METHODS[m][1], "label": LABELS[m]} for m in methods},
        "table": rows,
        "runs": records,
        "errors": errors,
        "expected_runs": len(cfg.methods) * len(cfg.targets) * len(cfg.seeds),
        "wall_seconds_this_process": time.perf_counter() - started,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(out / "frontier.json", result)
    markdown = frontier_markdown(rows, baseline, cfg.model, cfg.width_mult)
    atomic_write(out / "frontier.md", lambda fh: fh.write(markdown.encode()))
    data_name = Path(cfg.data_root).name if cfg.dataset == "folder" and cfg.data_root else cfg.dataset
    title = (
        f"{cfg.model} w{cfg.width_mult:g} on {data_name}: KD {cfg.finetune_epochs}/stage + "
        f"{cfg.final_finetune_epochs} final, seeds {', '.join(map(str, cfg.seeds))}"
    )
    plot_frontier(out / "frontier.png", rows, baseline, methods, title)
    return result


def _check_same_frontier(out: Path, cfg: FrontierConfig) -> None:
    """Refuse to mix runs of different settings in one folder (methods, targets and seeds may differ)."""
    path = out / "config.json"
    if not path.is_file():
        write_json(path, cfg)
        return
    saved = json.loads(path.read_text())
    free = {"methods", "targets", "seeds", "threads", "device", "progress", "out", "quick"}
    diff = sorted(k for k, v in saved.items() if k not in free and getattr(cfg, k, v) != v)
    if diff:
        raise CliError(f"{out} holds a frontier with other settings ({', '.join(diff)}); use another --out")


def run(cfg: FrontierConfig) -> dict:
    """Train (or reuse) the baseline, run every method x target x seed, write the frontier files."""
    cfg = resolve(cfg)
    started = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_frontier(out, cfg)
    checkpoint, baseline = _baseline(cfg, out)
    errors: list[dict] = []
    total = len(cfg.seeds) * len(cfg.targets) * len(cfg.methods)
    done = 0
    # seeds outermost: an interrupted frontier already holds every method and target at the first seeds
    for seed in cfg.seeds:
        for target in cfg.targets:
            for method in cfg.methods:
                done += 1
                folder = _run_dir(out, method, target, seed)
                if (folder / "summary.json").is_file():
                    continue
                logger.info("frontier run %d/%d: %s at MACs %g, seed %d", done, total, method, target, seed)
                t0 = time.perf_counter()
                try:
                    _prune(cfg, checkpoint, method, target, seed, folder)
                except CliError:
                    raise
                except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
                    logger.exception("frontier run %s failed", folder)
                    errors.append({"run_dir": str(folder), "error": f"{type(err).__name__}: {err}"})
                logger.info("frontier run %s took %.0f s", folder.name, time.perf_counter() - t0)
                _write_outputs(cfg, out, baseline, started, errors)
    result = _write_outputs(cfg, out, baseline, started, errors)
    print((out / "frontier.md").read_text(), end="")
    mine = sum(r["method"] in cfg.methods for r in result["runs"])
    print(
        f"wrote {out / 'frontier.json'} and {out / 'frontier.png'}: {mine} of the {result['expected_runs']} runs of "
        f"--methods {' '.join(cfg.methods)} are done ({len(result['runs'])} runs in the folder)"
    )
    if errors:
        print(f"{len(errors)} run(s) failed; see 'errors' in frontier.json and rerun to retry them")
    return result

