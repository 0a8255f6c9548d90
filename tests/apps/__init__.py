"""Pipelines written for the tests, in the seed format, that the framework has never seen."""
