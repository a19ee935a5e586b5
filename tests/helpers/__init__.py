"""Helpers for the test suite (subprocess drivers and importable job functions)."""
