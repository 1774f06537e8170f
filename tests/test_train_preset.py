"""The embedded presets and the automatic CPU thread count (fast: no training)."""

from __future__ import annotations

import os

import pytest

from kdkernels.train.config import PRESETS, TrainConfig, preset
from kdkernels.train.runtime import threads


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
    assert threads.choose(3).threads == 3


def test_negative_thread_count_is_refused():
    with pytest.raises(ValueError, match="threads must be >= 0"):
        threads.choose(-1)


@pytest.mark.parametrize(("cores", "busy", "world", "expect"),
                         [(2, 0.1, 1, 2), (2, 1.5, 1, 1), (2, 8.0, 1, 1), (16, 3.2, 1, 13),
                          (16, 0.0, 4, 4), (16, 8.0, 4, 2), (1, 0.0, 1, 1), (4, None, 1, 4)])
def test_auto_threads_leave_busy_cores_out(monkeypatch, cores, busy, world, expect):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    choice = threads.choose(0, world, measure=lambda: busy)
    assert choice.threads == expect
    assert ("of" in choice.reason) == (expect < cores // world)  # says why fewer were chosen


def test_auto_threads_use_every_core_right_after_a_burst_of_load(monkeypatch):
    # The situation of the issue: a pip install just ended, so the 1-minute load average is
    # high, but over the measurement window the other processes used no CPU. The choice must
    # read the window (fake /proc/stat counters and clock), not the load average.
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 3.0, 1.0))
    clock = {"t": 0.0}
    burst = iter([(5000.0, 5200.0), (5000.0 + 1, 5200.0 + 300)])  # 1 busy jiffy in 300

    def sleep(s):
        clock["t"] += s

    def measure():
        return threads.busy_cores(read=lambda: next(burst), sleep=sleep)

    choice = threads.choose(0, 1, measure=measure)
    assert clock["t"] == threads.WINDOW_S
    assert choice.threads == 2 and choice.reason.startswith("2: all available cores")
    # The same counters with the other processes keeping one of the two cores busy.
    busy = iter([(5000.0, 5200.0), (5000.0 + 150, 5200.0 + 300)])
    m = threads.busy_cores(read=lambda: next(busy), sleep=sleep)
    assert m == pytest.approx(1.0)
    assert threads.choose(0, 1, measure=lambda: m).threads == 1


def test_busy_cores_reads_real_counters():
    # On Linux the counters exist and move; elsewhere the choice falls back to every core.
    if threads.cpu_times() is None:
        pytest.skip("no /proc/stat")
    busy = threads.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6
