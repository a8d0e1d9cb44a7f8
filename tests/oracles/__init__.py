"""Eager restatements of upstream generators: the equivalence-test oracles (and the benchmarks'
materializing baselines). Not part of the package."""
