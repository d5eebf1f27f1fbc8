"""Parametrizations: what the optimizer moves (see base.py for the contract)."""
