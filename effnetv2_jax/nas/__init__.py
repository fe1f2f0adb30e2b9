"""Training-aware neural architecture search (EfficientNetV2 §3.3)."""
