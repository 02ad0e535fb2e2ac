"""Knowledge distillation: the loss, learning towards the teacher, the NaN guard, seeding."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keepgym.envs.data import load_dataset
from keepgym.envs.distill import distill, kd_loss
from keepgym.models import create_model


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(32, 5),
    )


def _batches(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)
    ]


def _soft_gap(student: nn.Module, teacher: nn.Module, batches) -> float:
    student.eval()
    with torch.no_grad():
        return sum(
            float(
                F.kl_div(
                    F.log_softmax(student(x), 1),
                    F.log_softmax(teacher(x), 1),
                    reduction="batchmean",
                    log_target=True,
                )
            )
            for x, _ in batches
        )


def test_kd_loss_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    temp, w = 2.0, 0.75
    p_t = F.softmax(t / temp, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / temp, 1))).sum(1).mean()
    expected = w * temp**2 * kl + (1 - w) * F.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, temp, w), expected, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, y, temp, 0.0), F.cross_entropy(s, y))
    assert float(kd_loss(t, t, y, temp, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_distill_moves_the_student_towards_the_teacher():
    teacher, student = _net(0).eval(), _net(1)
    batches = _batches()
    before = _soft_gap(student, teacher, batches)
    teacher_state = copy.deepcopy(teacher.state_dict())
    stats = distill(student, teacher, batches, steps=60, learning_rate=0.05, kd_weight=1.0, seed=0)
    assert stats.steps == 60 and not stats.diverged and math.isfinite(stats.mean_loss)
    assert _soft_gap(student, teacher, batches) < 0.5 * before
    assert not student.training  # left in eval mode
    assert stats.learning_rate == pytest.approx(1e-6)  # cosine reached min_learning_rate
    for k, v in teacher.state_dict().items():  # the teacher is never changed
        assert torch.equal(v, teacher_state[k])


def test_distill_on_a_dataset_and_a_pruned_width():
    data = load_dataset("synthetic", train_size=80, test_size=4, val_size=8, image_size=16)
    teacher = create_model("resnet20", num_classes=10, width_mult=0.25).eval()
    student = create_model("resnet20", num_classes=10, width_mult=0.125)
    stats = distill(student, teacher, data, steps=3, batch_size=16, seed=1)
    assert stats.steps == 3 and math.isfinite(stats.last_loss)


def test_nan_guard_restores_the_last_good_weights():
    teacher, student = _net(0).eval(), _net(1)
    start = copy.deepcopy(student.state_dict())
    batches = _batches(2)
    batches.append((torch.full((16, 3, 8, 8), float("nan")), torch.zeros(16, dtype=torch.long)))
    stats = distill(student, teacher, batches, steps=10, guard_interval=100, seed=0)
    assert stats.diverged and stats.steps == 2 and stats.restored_step == 0
    for k, v in student.state_dict().items():
        assert torch.equal(v, start[k]), k
    # with a guard copy every step, the weights after the last good step are kept
    student = _net(1)
    stats = distill(student, teacher, batches, steps=10, guard_interval=1, seed=0)
    assert stats.diverged and stats.restored_step == 2
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_seeded_runs_are_identical_and_leave_the_global_rng_alone():
    teacher = _net(0).eval()
    results = []
    for _ in range(2):
        student = _net(1)
        torch.manual_seed(123)
        state = torch.random.get_rng_state()
        distill(student, teacher, _batches(), steps=5, seed=7)
        assert torch.equal(torch.random.get_rng_state(), state)
        results.append(student.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_bad_arguments():
    teacher, student = _net(0), _net(1)
    before = copy.deepcopy(student.state_dict())
    assert distill(student, teacher, _batches(), steps=0).steps == 0
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k])
    for kwargs in (
        {"steps": -1},
        {"steps": 1, "temperature": 0},
        {"steps": 1, "kd_weight": 1.5},
        {"steps": 1, "learning_rate": 0.0},
    ):
        with pytest.raises(ValueError):
            distill(student, teacher, _batches(), **kwargs)
    with pytest.raises(ValueError, match="no batches"):
        distill(student, teacher, [], steps=1)
