"""Shared test setup: make the repository root importable as the `tests` package's parent."""
