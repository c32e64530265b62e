"""Model adapters, one module per model family; each loads the published checkpoint format."""
