"""Stage worker entry points: GPU pinning, model warm-up, batching, health."""
