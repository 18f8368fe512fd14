"""Benchmarks of tasklib-sqla beside a plain-asyncpg baseline (not part of the test suite)."""
