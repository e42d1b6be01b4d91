"""Benchmarks that print figures, not timed tests: `bench.ingest`, `bench.profile`."""
