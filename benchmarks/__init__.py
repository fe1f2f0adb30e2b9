"""Speed benchmarks of effnetv2_jax against timm and keras (see README.md)."""
