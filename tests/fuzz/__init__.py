"""Fuzzing of the ingest path: the harness, run briefly by tests/test_fuzz_ingest.py."""
