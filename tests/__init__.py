"""Tests of xtra-repro (a package so that `tests.fixtures` imports under plain `pytest` too)."""
