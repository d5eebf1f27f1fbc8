"""The data holder: evaluator, policy, ledger, and the loop that dials the coordinator."""
