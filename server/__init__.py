"""The coordinator: optimizers, run state, and the transports that carry its tasks."""
