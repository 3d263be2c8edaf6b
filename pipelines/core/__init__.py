"""Billing core: pure, typed, vectorised rating of meter readings into ledger entries.

No Kafka, clocks or I/O here: callers pass explicit state and a batch of inputs and get
new state and outputs back (see `pipelines.core.engine.process_batch`).
"""
