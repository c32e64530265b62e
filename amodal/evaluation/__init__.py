"""``amodal eval``: the quality benchmark on synthetic pastes and real amodal datasets."""

METRICS = ("iou", "hidden_iou", "repainted", "ssim", "lpips", "feature_similarity", "clip_score")  # per-row scores
