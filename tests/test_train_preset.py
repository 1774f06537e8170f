"""The embedded presets and the automatic CPU thread count (fast: no training)."""

from __future__ import annotations

import os

import pytest

from kdkernels.train import threads
from kdkernels.train.config import PRESETS, TrainConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_keep_the_student_smaller(name):
    cfg = preset(name)
    t, s = cfg.teacher_size, cfg.student_size
    assert s.hidden < t.hidden and s.layers <= t.layers
    assert t.hidden % t.heads == 0 and s.hidden % s.heads == 0
    assert cfg.warmup_steps < min(cfg.max_steps, cfg.teacher_steps)
    assert not cfg.bf16  # bf16 matmul is far slower than fp32 on CPUs without AMX
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_threads_are_not_part_of_the_fingerprint():
    assert preset("smoke", threads=1).fingerprint() == preset("smoke", threads=2).fingerprint()


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="--preset must be one of default, smoke"):
        preset("fast")


def test_explicit_thread_count_is_kept():
    assert threads.choose(3) == 3


def test_negative_thread_count_is_refused():
    with pytest.raises(ValueError, match="threads must be >= 0"):
        threads.choose(-1)


@pytest.mark.parametrize(("cores", "load", "world", "expect"),
                         [(2, 0.1, 1, 2), (2, 1.5, 1, 1), (2, 8.0, 1, 1), (16, 3.2, 1, 13),
                          (16, 0.0, 4, 4), (16, 8.0, 4, 2), (1, 0.0, 1, 1)])
def test_auto_threads_leave_busy_cores_out(monkeypatch, cores, load, world, expect):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert threads.choose(0, world) == expect
