"""How the commands pick their torch threads on a shared machine (cli/common.py ``pick_threads``): the cores other
processes keep busy both now and over the last minute are left free; OMP_NUM_THREADS overrides."""

import os
import time

import pytest
import torch

from finetune_ref.cli import common, main as cli_main


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("now,minute,expected", [
    (0.0, 1.0, 2),   # a job that just ended still weighs on the load average: not busy now, all threads
    (1.0, 0.0, 2),   # a moment's spike, the minute was quiet: all threads
    (1.0, 1.0, 1),   # a job running all along: one core left to it
    (0.4, 1.2, 2),   # rounded: under half a core busy now
    (2.0, 3.0, 1),   # never fewer than one
    (None, 1.0, 1),  # no /proc/stat (not Linux): the load average alone
])
def test_busy_now_and_over_the_minute(monkeypatch, two_threads, now, minute, expected):
    monkeypatch.setattr(common, "busy_cores", lambda window=0.1: now)
    monkeypatch.setattr(common, "load_average", lambda: minute)
    assert common.pick_threads() == expected


def test_one_thread_needs_no_measuring(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(common, "busy_cores", lambda window=0.1: pytest.fail("measured"))
        assert common.pick_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc/stat")
def test_busy_cores_sees_a_spinning_process():
    import multiprocessing

    idle = common.busy_cores(0.2)
    assert idle is not None and 0.0 <= idle <= os.cpu_count()
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,))
    spinner.start()
    try:
        time.sleep(0.2)
        busy = common.busy_cores(0.3)
    finally:
        stop.set()
        spinner.join()
    assert busy >= 0.6  # one core spinning (other processes may add to it)


def _spin(stop):
    while not stop.is_set():
        pass


def test_omp_num_threads_overrides(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(common, "busy_cores", lambda window=0.1: pytest.fail("measured"))
    assert cli_main._threads() is None  # torch's own count, as OpenMP set it


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5"])
def test_an_invalid_omp_num_threads_is_said_and_ignored(monkeypatch, capsys, two_threads, value):
    # libgomp ignores it too (and torch then takes every core): the busy cores are still left free
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    monkeypatch.setattr(cli_main, "pick_threads", lambda: 1)
    assert cli_main._threads() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"OMP_NUM_THREADS={value!r} is not a positive integer" in err[0]
