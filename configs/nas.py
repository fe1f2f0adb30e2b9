r"""Training-aware architecture search (EfficientNetV2 §3.3), three settings.

Argument: `tiny`, `digits` or `b4_imagenet`.

    python -m effnetv2_jax.nas --config=configs/nas.py:digits --workdir=/tmp/nas
    python -m effnetv2_jax.nas report --workdir=/tmp/nas      # table, pareto.png
    python -m effnetv2_jax.nas export --workdir=/tmp/nas --rank 1 --output arch.json
    python -m effnetv2_jax.main --config=configs/digits.py \
        --config.model.arch=arch.json --workdir=/tmp/digits_nas1

The space is stage-wise over a backbone (per stage: MBConv or Fused-MBConv,
r-1/r/r+1 layers, kernel 3 or 5, expansion 1, 4 or 6; the backbone's
channels and strides). Each trial trains for a short budget on the train set
minus a holdout, is scored on the holdout, and is timed; the reward is
A * S^-0.07 * P^-0.05 with S and P relative to the backbone timed in the same
search (`search.w`, `search.v`). `config.trial` is an ordinary trainer
config: any of its keys can be changed with --config.trial.<key>=<value>.

  tiny         a two-stage 8-16 channel backbone (`models/small.py` TINY) on
               digits, 2 epochs per trial, 4 trials, 2 in flight: the
               smoke test; under 5 minutes on 2 cores (expected result: 4
               completed trials and a pareto.png, rewards around 0.3-0.8:
               2 epochs teach a tiny network little).
  digits       the digits quickstart's network (EfficientNetV2-S at a
               quarter width and depth) as backbone, 10-epoch trials at 16
               -> 24 px (the quickstart trains 30 epochs at 16 -> 32 px), 16
               trials, regularized evolution, 2 in flight. About 25 minutes
               on 2 cores; README "Architecture search" has a measured run.
  b4_imagenet  the paper's setting: EfficientNet-B4 backbone, up to 1000
               trials of 10 epochs on ImageNet at reduced size (128 -> 192
               px, eval 224), minival of 25,000 training images held out
               (as the paper), REINFORCE. One trial is about 3.5 TPUv3-8
               hours at batch 1024 (10 epochs at roughly 1000 images/s/core
               at 160 px); the search is a pod-scale job: run it with
               --backend=ray, one trial per host.
"""

import ml_collections

from effnetv2_jax.models import small
from effnetv2_jax.nas import settings
from effnetv2_jax.training import recipes


def search_config(**overrides):
  """`settings.default_search_config()` with this setting's values."""
  s = settings.default_search_config()
  s.update(overrides)
  return s


def _small_evolution(search):
  # A population of 8 (tournaments of 3): evolution starts mutating after
  # half of a 16-trial search instead of never.
  search.algorithm_options.population_size = 8
  search.algorithm_options.tournament_size = 3
  return search


def _tiny():
  t = recipes.base_config()
  t.experiment = 'nas_tiny_trial'
  t.model.arch = small.TINY.to_dict()
  t.data.dataset = 'digits'
  t.data.augment = 'none'
  t.data.holdout = 0.1
  t.train.epochs = 2.0
  t.train.batch_size = 64
  t.schedule.lr_per_256 = 0.16
  t.schedule.kind = 'cosine'
  t.schedule.warmup_epochs = 0.2
  t.progressive.num_stages = 2
  t.progressive.min_image_size = 16
  t.progressive.max_image_size = 24
  t.progressive.randaug_magnitude = (0.0, 0.0)
  t.progressive.dropout_rate = (0.0, 0.1)
  t.eval.batch_size = 144
  t.eval.image_size = 24
  t.eval.every_steps = 0
  t.log_every_steps = 10
  return t, _small_evolution(search_config(
      backbone='tiny', num_trials=4, time_limit_s=300.0, reference_every=4))


def _digits():
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'digits.py')
  spec = importlib.util.spec_from_file_location('digits_config', path)
  digits = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(digits)
  t = digits.get_config()
  t.experiment = 'nas_digits_trial'
  t.train.epochs = 10.0
  t.progressive.num_stages = 2
  t.progressive.max_image_size = 24
  t.eval.image_size = 24
  t.eval.batch_size = 144
  t.log_every_steps = 20
  t.progress_bar = 'off'
  return t, _small_evolution(search_config(
      backbone='digits', num_trials=16, time_limit_s=900.0,
      reference_every=8))


def _b4_imagenet():
  t = recipes.base_config()
  recipes.apply_imagenet_recipe(t, 's', 'paper')  # its optimizer and regularisation
  t.experiment = 'nas_b4_imagenet_trial'
  t.data.dataset = 'imagenet2012'
  t.data.holdout = 25_000  # the paper's minival
  t.train.epochs = 10.0
  t.train.batch_size = 1024
  t.progressive.num_stages = 2
  t.progressive.min_image_size = 128
  t.progressive.max_image_size = 192
  t.eval.image_size = 224
  t.eval.every_steps = 0
  return t, search_config(
      backbone='efficientnet-b4', algorithm='reinforce', num_trials=1000,
      max_in_flight=1, time_limit_s=8 * 3600.0, reference_every=50,
      timing=ml_collections.ConfigDict(dict(batch_size=0, warmup_steps=5,
                                            steps=20)))


_SETTINGS = {'tiny': _tiny, 'digits': _digits, 'b4_imagenet': _b4_imagenet}


def get_config(arg=None):
  args = recipes.parse_arg(arg, setting='tiny')
  if args.setting not in _SETTINGS:
    raise ValueError(f'unknown NAS setting {args.setting!r}; choose one of '
                     f'{", ".join(_SETTINGS)}')
  trial, search = _SETTINGS[args.setting]()
  c = ml_collections.ConfigDict()
  c.experiment = f'nas_{args.setting}'
  c.search = search
  c.trial = trial
  return c
