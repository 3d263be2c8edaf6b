"""Benchmarks that print JSON figures (speed targets are checked here, not in tests)."""
