"""Frozen reference: the billing core's interval, tariff and batch step as of commit eb863f8,
before the speed work (all polars joins/sorts, per-batch time-zone conversion).

Used only by `pipelines.core.bench --compare` (old vs new in the same run) and by the
equivalence tests in tests/unit/core; it shares models, wallet and the state/output containers
with the live core. Delete once the optimised path has earned trust.
"""
