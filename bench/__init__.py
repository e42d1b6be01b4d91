"""Benchmarks that print figures (not timed tests): `python -m bench.ingest`, `python -m bench.profile`."""
