"""The randomized fault soak (bench/soak.py), short enough for CI: about a minute of load from
three clients while the nemesis kills, pauses, restarts and cuts parts of the stack, then the
total-queue checker.  Run it alone with ``pytest -m soak``; ``CXR_SOAK_SEED`` replays a seed
(its schedule is printed), ``CXR_SOAK_SECONDS`` lengthens it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from bench.soak import SoakConfig, make_schedule, run_soak

pytestmark = [pytest.mark.soak, pytest.mark.integration]


def test_the_fault_schedule_is_a_function_of_the_seed() -> None:
    kinds = ("worker_kill", "pool_kill", "postgres_cut", "redis_restart_aof")
    first = make_schedule(7, 120, kinds, workers=2, gap=5)
    assert first == make_schedule(7, 120, kinds, workers=2, gap=5)
    assert first != make_schedule(8, 120, kinds, workers=2, gap=5)
    assert {f.kind for f in first[: len(kinds)]} == set(kinds)  # each kind once per round
    assert all(3 <= f.at <= 115 for f in first)


def test_under_random_faults_every_accepted_image_ends_once_with_the_models_score(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CXR_SOAK_SEED") or random.SystemRandom().randrange(1_000_000))
    seconds = float(os.environ.get("CXR_SOAK_SECONDS") or 55)
    print(f"soak seed {seed} (replay: CXR_SOAK_SEED={seed} pytest -m soak)")
    report = run_soak(SoakConfig(seconds=seconds, seed=seed), tmp_path)
    assert not report.problems, report.failure_message()
    injected = [r for r in report.records if not r.skipped]
    assert len(injected) >= 5, f"seed {seed}: only {len(injected)} faults were injected"
    assert report.verdict.images >= 100, f"seed {seed}: only {report.verdict.images} images"
