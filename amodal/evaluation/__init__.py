"""``amodal eval``: the quality benchmark on synthetic occlusions over whole-object masks."""

METRICS = ("iou", "ssim", "lpips", "feature_similarity", "clip_score")  # the per-row scores a report averages
