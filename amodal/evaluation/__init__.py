"""``amodal eval``: the quality benchmark on synthetic occlusions over whole-object masks."""
