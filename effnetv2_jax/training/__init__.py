"""Training: optimizer, schedules, progressive stages, and the trainer.

`optimizer`, `schedules`, `progressive` and `ema` import neither tensorflow
nor ml_collections (NAS drivers and benchmarks use them). The trainer pulls
in tensorflow, clu and orbax, so it is loaded on first use:

    from effnetv2_jax.training import train_and_evaluate
    state, summary = train_and_evaluate(config, workdir)
"""

__all__ = ['train_and_evaluate']


def __getattr__(name):
  if name == 'train_and_evaluate':
    from effnetv2_jax.training.trainer import train_and_evaluate
    return train_and_evaluate
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
