"""The protocol's vocabulary: messages, their bounds, answer costs, the seed schedule."""
