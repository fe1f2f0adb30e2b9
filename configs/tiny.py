r"""A seconds-long run for tests and smoke checks (not an experiment).

Two progressive stages (16 and 24 px) of a two-stage network with 8-16
channels, a handful of steps, evaluation at 32 px, checkpoints every 2 steps.

    python -m effnetv2_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
    python -m effnetv2_jax.main --config=configs/tiny.py:cifar10 \
        --workdir=/tmp/tiny   # under tfds.testing.mock_data in the tests

Expected result: none; the loss is finite and the run resumes exactly.
"""

from effnetv2_jax.models import small
from effnetv2_jax.training import recipes

TINY_ARCH = small.TINY


def get_config(arg=None):
  args = recipes.parse_arg(arg, dataset='digits', controller='linear')
  c = recipes.base_config()
  c.experiment = f'tiny_{args.dataset}'
  c.model.arch = TINY_ARCH.to_dict()
  c.model.drop_path_rate = 0.2
  c.data.dataset = args.dataset
  c.data.augment = 'none'
  c.train.epochs = 0.0
  c.train.total_steps = 8
  c.train.batch_size = 16
  c.schedule.lr_per_256 = 0.16
  c.schedule.warmup_epochs = 0.0
  c.schedule.decay_epochs = 0.02
  c.progressive.num_stages = 2
  c.progressive.min_image_size = 16
  c.progressive.max_image_size = 24
  c.progressive.randaug_magnitude = (0.0, 0.0)
  c.progressive.dropout_rate = (0.0, 0.1)
  c.eval.batch_size = 64
  c.eval.every_steps = 0
  c.checkpoint.every_steps = 2
  c.checkpoint.keep = 2
  c.log_every_steps = 2
  c.progress_bar = 'off'
  recipes.apply_controller(c, args.controller, holdout=32)
  return c
