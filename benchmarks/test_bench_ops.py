"""pytest-benchmark suites, one group per op, every variant on the same inputs:

    pytest benchmarks --benchmark-only --benchmark-group-by=group

Set WSSS_BENCH_QUICK=1 for the small cases. The ratio table with peak memory is
``python -m benchmarks.report``."""

import os

import pytest

from benchmarks import cases

QUICK = os.environ.get("WSSS_BENCH_QUICK") == "1"
ATTENTION = cases.AttentionCase(patches=576, blocks=6) if QUICK else cases.AttentionCase()
MERGE = cases.MergeCase(height=240, width=320) if QUICK else cases.MergeCase()
WALK = cases.RandomWalkCase(height=24, width=32) if QUICK else cases.RandomWalkCase()
PATHS = cases.PathAffinityCase(batch=2, size=48) if QUICK else cases.PathAffinityCase()


@pytest.mark.benchmark(group="attention_stats")
@pytest.mark.parametrize("variant", ["sdpa", "attention_stats", "materializing"])
def test_attention_stats(benchmark, variant):
    make = {"sdpa": cases.make_sdpa, "attention_stats": cases.make_attention_stats,
            "materializing": cases.make_materializing}[variant]
    benchmark.pedantic(make(ATTENTION), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="propagate")
@pytest.mark.parametrize("form", ["dense", "streaming"])
def test_propagate(benchmark, form):
    benchmark.pedantic(cases.make_propagate(form, ATTENTION), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="multiscale_merge")
@pytest.mark.parametrize("face", ["fused", "reference"])
def test_multiscale_merge(benchmark, face):
    benchmark.pedantic(cases.make_merge(MERGE, face), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="random_walk")
@pytest.mark.parametrize("form", ["fused", "dense"])
def test_random_walk(benchmark, form):
    # The dense walk takes minutes at VOC size: one round, no warm-up.
    slow = form == "dense" and not QUICK
    benchmark.pedantic(cases.make_random_walk(WALK, form), rounds=1 if slow else 3,
                       warmup_rounds=0 if slow else 1)


@pytest.mark.benchmark(group="class_patch_reweight")
@pytest.mark.parametrize("face", ["fused", "reference"])
def test_class_patch_reweight(benchmark, face):
    benchmark(cases.make_reweight(face))


@pytest.mark.benchmark(group="path_affinity")
@pytest.mark.parametrize("form", ["fused", "gather"])
def test_path_affinity(benchmark, form):
    benchmark.pedantic(cases.make_path_affinity(PATHS, form), rounds=3, warmup_rounds=1)
