"""Shared pieces both sides agree on: the log, directions, parametrizations, answers, fitness."""
