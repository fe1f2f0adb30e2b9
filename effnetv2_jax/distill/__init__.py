"""Stacked self-distillation: a network trained toward a second extractor stacked on its own features."""
