"""``keepgym bench``: the project's speed benchmarks, each writing JSON to ``--out``.

Every benchmark measures the things it compares side by side in one process and reports their
ratio, so a figure means the same on a busy shared machine as on a quiet one. Each JSON holds the
machine description, the command line that produced it and the raw timings.

* ``data``: in-memory loader (augmentation + normalisation) vs the model's forward+backward on
  the same batches (target: loader < 10 % of a training step).
* ``prune-step``: ``PruneEnv.evaluate(action)`` split into importance / masking / evaluation vs
  the pure forward of the physically pruned model; and ``evaluate`` with the masked, physical and auto
  candidate paths side by side at stages of 1 / 10 / 25 % of the channels.
* ``vit``: ViT training step time and inference images/s at keep 100/75/50/25 %.
* ``prune``: wall time of one stage search (K x E candidates) on a full-width model.
* ``agentvit``: joint ViT + agent training vs full-patch ViT training, per step.
* ``ray`` (not in ``all``; needs ``pip install -e .[ray]``): a stage's candidate search, serial vs a
  2-worker Ray ``ActorPool``.
* ``score-fidelity`` (not in ``all``): rank correlation of ``vanilla`` and ``adaptive_bn`` candidate scores
  with the candidates' accuracy after the same short KD (:mod:`keepgym.experiments.score_fidelity`), on a
  trained model (``--checkpoint``; ``--quick``: a random tiny model on synthetic data, plumbing only);
  writes ``score-fidelity.json`` and ``score-fidelity.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from keepgym.experiments.common import CliError, arg, machine_info, write_json

__all__ = ["BenchConfig", "run", "bench_data", "COMMAND", "DESCRIPTION", "Config"]

logger = logging.getLogger(__name__)

COMMAND = "bench"
DESCRIPTION = "Run speed benchmarks (data, prune-step, vit, prune, agentvit, all) and write JSON."
BENCHMARKS = ("data", "prune-step", "vit", "prune", "agentvit")
EXTRA_BENCHMARKS = ("ray", "score-fidelity", "search")  # optional extra / needs a trained model; not in "all"


@dataclasses.dataclass
class BenchConfig:
    """Settings of ``keepgym bench``."""

    which: str = arg("all", help="benchmark to run", choices=(*BENCHMARKS, *EXTRA_BENCHMARKS, "all"))
    out: str = arg("bench", help="folder for the JSON files")
    device: str = arg("cpu", help="cpu, cuda or auto")
    quick: bool = arg(False, help="smaller sizes (for tests and a first look)")
    repeats: int = arg(5, help="timed repeats (the median is reported)")
    threads: int | None = arg(None, help="torch CPU threads (default: torch's)")
    # score-fidelity only
    model: str = arg("vgg11", help="score-fidelity: model name of --checkpoint")
    dataset: str = arg("folder", help="score-fidelity: dataset of the model")
    data_root: str | None = arg(None, help="score-fidelity: data folder or archive")
    checkpoint: str | None = arg(None, help="score-fidelity: trained model file")
    image_size: int | None = arg(None, help="score-fidelity: image size (image folders)")
    candidates: int = arg(20, help="score-fidelity: candidate allocations")
    stage_macs: float = arg(0.3, help="score-fidelity: fraction of the MACs the stage removes")
    kd_steps: int = arg(30, help="score-fidelity: KD steps of every candidate's recovery")
    eval_size: int | None = arg(None, help="score-fidelity: validation images to score on (None: all)")
    seed: int = arg(0, help="score-fidelity: seed")
    # search only
    stages: int = arg(10, help="search: stages to search and commit")
    stage_sparsity: float = arg(0.01, help="search: fraction of the channels a stage removes")
    sample_num: int = arg(10, help="search: candidates per round (K)")
    rounds_per_stage: int = arg(10, help="search: rounds per stage (E)")
    racing_eta: float = arg(3.5, help="search: halving factor of the racing search")
    racing_keep: int = arg(2, help="search: candidates of a round scored on every image")
    candidate_scoring: str = arg("vanilla", help="search: candidate scoring")
    compare_exhaustive: bool = arg(False, help="search: run the exhaustive search side by side on every stage")


Config = BenchConfig


def add_arguments(parser) -> None:
    """``keepgym bench [WHICH] --out DIR``: WHICH is positional, as in the README."""
    parser.add_argument(
        "which", nargs="?", default="all", choices=(*BENCHMARKS, *EXTRA_BENCHMARKS, "all"), help="benchmark to run"
    )
    parser.add_argument("--out", default="bench", help="folder for the JSON files (default: bench)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for tests and a first look)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default: 5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 gives steadier ratios on a busy machine)",
    )
    fidelity = parser.add_argument_group("score-fidelity")
    fidelity.add_argument("--model", default="vgg11", help="model name of --checkpoint (default: vgg11)")
    fidelity.add_argument("--dataset", default="folder", help="dataset of the model (default: folder)")
    fidelity.add_argument("--data-root", default=None, help="data folder or archive (e.g. cifar10-jpeg.tar.gz)")
    fidelity.add_argument("--checkpoint", default=None, help="trained model file (keepgym train's model.pt)")
    fidelity.add_argument("--image-size", type=int, default=None, help="image size (image folders)")
    fidelity.add_argument("--candidates", type=int, default=20, help="candidate allocations (default: 20)")
    fidelity.add_argument(
        "--stage-macs", type=float, default=0.3, help="fraction of the MACs the stage removes (default: 0.3)"
    )
    fidelity.add_argument("--kd-steps", type=int, default=30, help="KD steps per candidate's recovery (default: 30)")
    fidelity.add_argument("--eval-size", type=int, default=None, help="validation images to score on (default: all)")
    fidelity.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    search = parser.add_argument_group("search (also takes the model and data flags above)")
    search.add_argument("--stages", type=int, default=10, help="stages to search and commit (default: 10)")
    search.add_argument(
        "--stage-sparsity", type=float, default=0.01, help="fraction of the channels a stage removes (default: 0.01)"
    )
    search.add_argument("--sample-num", type=int, default=10, help="RL-Pruner candidates per round K (default: 10)")
    search.add_argument("--rounds-per-stage", type=int, default=10, help="RL-Pruner rounds per stage E (default: 10)")
    search.add_argument(
        "--racing-eta", type=float, default=3.5, help="halving factor of the racing search, >= 2 (default: 3.5)"
    )
    search.add_argument(
        "--racing-keep", type=int, default=2, help="candidates of a round scored on every image (default: 2)"
    )
    search.add_argument(
        "--candidate-scoring", default="vanilla", choices=("vanilla", "adaptive_bn"), help="(default: vanilla)"
    )
    search.add_argument(
        "--compare-exhaustive",
        action="store_true",
        help="also run today's exhaustive search on every stage, from the same point, and compare time and pick",
    )


def config_from_args(args) -> BenchConfig:
    return BenchConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(BenchConfig)})


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_data(device: str = "cpu", quick: bool = False, repeats: int = 5) -> dict:
    """Loader cost vs one training step of vgg11 (width 0.25) on synthetic 32x32, batch 128."""
    from keepgym.envs.data import BatchLoader, load_dataset
    from keepgym.models import create_model

    n = 512 if quick else 4096
    data = load_dataset("synthetic", train_size=n + n // 8, val_size=n // 8)
    loader = BatchLoader(data.train_x, data.train_y, data, 128, augment=True, drop_last=True, device=device)
    model = create_model("vgg11", num_classes=data.num_classes, width_mult=0.25).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = list(loader)

    def load_epoch():
        for _ in loader:
            pass

    def train_epoch():
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t_load = _median_time(load_epoch, repeats)
    t_train = _median_time(train_epoch, repeats)
    nb = len(loader)
    return {
        "benchmark": "data",
        "model": "vgg11 width 0.25",
        "dataset": "synthetic 3x32x32",
        "batch_size": 128,
        "batches": nb,
        "loader_batches_per_second": nb / t_load,
        "train_step_batches_per_second": nb / t_train,
        "loader_seconds_per_batch": t_load / nb,
        "train_step_seconds_per_batch": t_train / nb,
        "loader_fraction_of_step": t_load / t_train,
        "target": "loader_fraction_of_step < 0.10",
        "passed": t_load / t_train < 0.10,
    }


def _vgg19_env(width: float, images: int, device: str, **env_kwargs) -> Any:
    """A ``PruneEnv`` on a random VGG-19 at ``width`` over synthetic 32x32 data of 100 classes."""
    from keepgym.envs.data import load_dataset
    from keepgym.envs.prune_env import PruneEnv

    data = load_dataset("synthetic", num_classes=100, train_size=images * 2, val_size=images)
    return PruneEnv(
        model_name="vgg19",
        dataset="synthetic",
        data=data,
        pretrained=False,
        width_mult=width,
        calibration_size=128,
        device=device,
        **env_kwargs,
    )


def _bench_prune_step(device: str, quick: bool, repeats: int) -> dict:
    """``PruneEnv.evaluate`` on VGG-19 (width 1.0, 1,000 validation images; quick: width 0.25, 200)."""
    import numpy as np

    from keepgym.envs.prune_env import compare_candidate_paths, profile_evaluate

    width, images = (0.25, 200) if quick else (1.0, 1000)
    env = _vgg19_env(width, images, device)
    env.reset(seed=0)
    action = np.ones(env.action_space.shape, dtype=np.float32)
    timings = profile_evaluate(env, action, repeats=repeats)
    masking = timings["surgery_s"]
    paths = {}  # masked vs physical vs auto candidate forwards, side by side, per stage size
    for stage in (0.01, 0.1, 0.25):
        staged = _vgg19_env(width, images, device, stage_sparsity=stage)
        staged.reset(seed=0)
        paths[str(stage)] = compare_candidate_paths(staged, action, rounds=repeats)
    return {
        "benchmark": "prune-step",
        "model": f"vgg19 width {width}",
        "validation_images": images,
        **timings,
        "masking_fraction_of_forward": masking / timings["forward_s"],
        "candidate_paths_by_stage_sparsity": paths,
        "target": "masking (surgery + bookkeeping) < 0.5 x forward of the pruned model",
        "passed": masking / timings["forward_s"] < 0.5,
    }


def _bench_vit(device: str, quick: bool, repeats: int) -> dict:
    from keepgym.envs.patch_select_env import benchmark_vit

    if quick:
        rows = benchmark_vit(batch_size=32, steps=2, device=device, preset="vit_small")
    else:
        rows = benchmark_vit(device=device)
    return {"benchmark": "vit", "rows": rows}


def _bench_prune(device: str, quick: bool, repeats: int) -> dict:
    """One RL-Pruner stage search on VGG-19 (full width; quick: 0.25), synthetic 32x32, 100 classes.

    Runs a real stage with K x E = 2 x 2 candidates and extrapolates to the reference K x E = 10 x 10
    from the measured parts (importance once, one evaluate per candidate, one committed step).
    """
    import numpy as np

    from keepgym.agents import RLPruner

    width, images = (0.25, 200) if quick else (1.0, 1000)
    env = _vgg19_env(width, images, device, target_sparsity=0.6, stage_sparsity=0.01)
    agent = RLPruner("MlpPolicy", env, sample_num=2, rounds_per_stage=2, seed=0)
    t = time.perf_counter()
    agent.learn(1)
    stage_s = time.perf_counter() - t
    raw = agent.env.envs[0].unwrapped
    action = np.ones(raw.action_space.shape, dtype=np.float32)
    t = time.perf_counter()
    raw.evaluate(action)
    eval_s = time.perf_counter() - t
    rest_s = max(0.0, stage_s - 4 * eval_s)  # importance + commit step + bookkeeping
    return {
        "benchmark": "prune",
        "model": f"vgg19 width {width}",
        "validation_images": images,
        "measured_stage_seconds_k2_e2": stage_s,
        "evaluate_seconds_per_candidate": eval_s,
        "stage_overhead_seconds": rest_s,
        "estimated_stage_seconds_k10_e10": rest_s + 100 * eval_s,
        "note": "estimate = measured overhead + 100 x measured evaluate; KD fine-tuning not included",
    }


def _bench_agentvit(device: str, quick: bool, repeats: int) -> dict:
    from keepgym.experiments.agentvit import benchmark_agentvit

    return benchmark_agentvit(device=device, quick=quick)


def _bench_ray(device: str, quick: bool, repeats: int) -> dict:
    from keepgym.envs.ray_backend import benchmark_ray_search, require_ray

    try:
        require_ray()
    except ImportError as err:  # the message carries the install command
        raise CliError(str(err)) from None
    return {"benchmark": "ray", **benchmark_ray_search(workers=2, candidates=8 if quick else 20, quick=quick)}


_RUNNERS = {
    "ray": _bench_ray,
    "data": lambda d, q, r: bench_data(d, q, r),
    "prune-step": _bench_prune_step,
    "vit": _bench_vit,
    "prune": _bench_prune,
    "agentvit": _bench_agentvit,
}


def run(cfg: BenchConfig) -> dict:
    """Run the chosen benchmarks; each writes ``OUT/<name>.json``; returns them all."""
    from keepgym.experiments.common import resolve_device

    if cfg.repeats < 1:
        raise CliError(f"--repeats must be >= 1, got {cfg.repeats}")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise CliError(f"--threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    names = BENCHMARKS if cfg.which == "all" else (cfg.which,)
    results = {}
    for name in names:
        logger.info("benchmark %s", name)
        start = time.perf_counter()
        if name == "score-fidelity":
            from keepgym.experiments.score_fidelity import bench_score_fidelity

            result = bench_score_fidelity(cfg, device, out)
        elif name == "search":
            from keepgym.experiments.search_bench import bench_search

            result = bench_search(cfg, device)
        else:
            result = _RUNNERS[name](device, cfg.quick, cfg.repeats)
        result["machine"] = machine_info()
        result["command"] = _command(cfg)
        result["device"] = device
        result["wall_seconds"] = time.perf_counter() - start
        write_json(out / f"{name}.json", result)
        results[name] = result
        sys.stdout.write(f"{name}: {_headline(result)} -> {out / (name + '.json')}\n")
    return results


def _command(cfg: BenchConfig) -> str:
    """The ``keepgym bench`` command line that reproduces this run."""
    parts = ["keepgym", "bench", cfg.which, "--out", cfg.out, "--device", cfg.device, "--repeats", str(cfg.repeats)]
    if cfg.quick:
        parts.append("--quick")
    if cfg.threads is not None:
        parts += ["--threads", str(cfg.threads)]
    if cfg.which == "search":
        for flag, value in (
            ("--stages", cfg.stages), ("--stage-sparsity", cfg.stage_sparsity), ("--sample-num", cfg.sample_num),
            ("--rounds-per-stage", cfg.rounds_per_stage), ("--racing-eta", cfg.racing_eta),
            ("--racing-keep", cfg.racing_keep), ("--candidate-scoring", cfg.candidate_scoring),
        ):
            parts += [flag, str(value)]
        if cfg.compare_exhaustive:
            parts.append("--compare-exhaustive")
    if cfg.which in ("score-fidelity", "search") and not cfg.quick:
        for flag, value in (
            ("--model", cfg.model), ("--dataset", cfg.dataset), ("--data-root", cfg.data_root),
            ("--checkpoint", cfg.checkpoint), ("--image-size", cfg.image_size), ("--candidates", cfg.candidates),
            ("--stage-macs", cfg.stage_macs), ("--kd-steps", cfg.kd_steps), ("--eval-size", cfg.eval_size),
            ("--seed", cfg.seed),
        ):
            fidelity_only = flag in ("--candidates", "--stage-macs", "--kd-steps")
            if value is not None and not (fidelity_only and cfg.which == "search"):
                parts += [flag, str(value)]
    return " ".join(parts)


def _headline(result: dict) -> str:
    if result.get("benchmark") == "score-fidelity":
        return "; ".join(
            f"{s}: Spearman {c['val']['spearman']:.3f} Kendall {c['val']['kendall']:.3f}"
            for s, c in result["correlations"].items()
        ) + " (with recovered validation accuracy)"
    if result.get("benchmark") == "search":
        summary = result["summary"]
        if "stage_time_ratio_total" not in summary:
            return f"racing: median {summary['racing_stage_s_median']:.2f} s per stage over {summary['stages']} stages"
        return (
            f"per-stage time exhaustive/racing x{summary['stage_time_ratio_total']:.2f} (search alone "
            f"x{summary['search_time_ratio_total']:.2f}); same pick in {100 * summary['equal_pick_rate']:.0f} % of "
            f"{summary['stages']} stages, within tolerance in {100 * summary['within_tolerance_rate']:.0f} %"
        )
    if result.get("benchmark") == "data":
        return (
            f"loader {result['loader_seconds_per_batch'] * 1e3:.2f} ms/batch vs train step "
            f"{result['train_step_seconds_per_batch'] * 1e3:.1f} ms/batch "
            f"(loader = {100 * result['loader_fraction_of_step']:.1f} % of a step)"
        )
    return ", ".join(f"{k}={v:.3g}" for k, v in result.items() if isinstance(v, float))[:300]
