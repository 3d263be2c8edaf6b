"""Avro contracts between collectors, pipelines and the sink (see docs/contracts.md)."""
