"""The base config and the two ImageNet recipes ('paper' and 'official').

Experiment files under `configs/` start from `base_config()` and change what
their experiment changes; the recipe tables live here, once, with their
sources (the paper's tables and google/automl's efficientnetv2 code).

Every optional value is an ml_collections placeholder, so it can be set from
the command line (`--config.data.data_dir=gs://...`) even when its default
is None. Fields where 0 means "take the architecture's value" say so.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from effnetv2_jax.models import arch as arch_lib

PRESETS = ('paper', 'official')

# Paper Table 6 (min = first stage, max = last stage). Only the S column is
# confirmed by two independent sources; M and L are not re-checked.
# XL and B0-B3 have no column: XL reuses L's, the B models see below.
PAPER_TABLE6 = {
    #      max size, RandAugment max, mixup max, dropout max
    's': (300, 15.0, 0.0, 0.3),
    'm': (380, 20.0, 0.2, 0.4),
    'l': (380, 25.0, 0.4, 0.5),
    'xl': (380, 25.0, 0.4, 0.5),
}
PAPER_MIN = dict(image_size=128, randaug=5.0, mixup=0.0, dropout=0.1)

# google/automl effnetv2_configs.py: RandAugment max magnitude and the
# mixup = cutmix alpha of each variant.
OFFICIAL_RANDAUG = {'s': 10.0, 'm': 15.0, 'l': 20.0, 'xl': 20.0}
OFFICIAL_MIX = {'s': 0.0, 'm': 0.2, 'l': 0.5, 'xl': 0.5}

# google/automl datasets.py: the images per epoch of ImageNet-1k's train
# split (train minus minival) that its schedule and step counts use. tfds'
# train[:98%], which the official code (and we) read, holds 1,255,544.
IMAGENET_OFFICIAL_TRAIN_IMAGES = 1_256_144

# Paper / README top-1 (%) on ImageNet-1k, for docstrings and summaries.
EXPECTED_TOP1 = {
    's': 83.9, 'm': 85.1, 'l': 85.7, 'xl': None,
    'b0': 78.7, 'b1': 79.8, 'b2': 80.5, 'b3': 82.1,
}


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with the official ImageNet-1k defaults."""
  c = ml_collections.ConfigDict()
  c.experiment = 'effnetv2'
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  # A variant name ('s', 'b0', ...) or an `Architecture.to_dict()` dict
  # (NAS trials, the quickstart); `object` lets either be set, also from the
  # command line (--config.model.arch=m).
  c.model.arch = config_dict.FieldReference('s', field_type=object)
  c.model.num_classes = 0  # 0: from the dataset
  # Survival 1 - rate * i / N for block i of N (official): the first block
  # 1.0, the last 1 - 0.2 (N - 1) / N (0.805 for S's 40 blocks).
  c.model.drop_path_rate = 0.2
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-3
  # 0: BN moments over the global batch (plain BN under jit). N: moments
  # over groups of N data-parallel replicas (1: per device). -1: the official
  # TPU BatchNorm, groups of min(8, replicas).
  c.model.bn_replicas_per_group = 0
  c.model.dtype = 'auto'  # bfloat16 compute on TPU/GPU, float32 on CPU
  # 'auto': XLA's convolutions on TPU/GPU; on one CPU device the oneDNN
  # ones (built on first use), else shifted depthwise. 'xla', 'shifted',
  # 'onednn' force one (effnetv2_jax/kernels, resolve_conv_impl).
  c.model.conv_impl = 'auto'

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'imagenet2012'
  c.data.data_dir = config_dict.placeholder(str)
  c.data.eval_split = config_dict.placeholder(str)
  # Validation examples carved from train for datasets without a validation
  # split: 0 none, a fraction in (0, 1), or a count (e.g. 5000). Stage-end
  # evals use them; the final eval uses eval_split (data/sources.py).
  c.data.holdout = 0.0
  # Build the global batches as an input pipeline split over this many
  # processes would (0: the job's own count): a one-host run then sees the
  # data order of an N-host run, e.g. to check or reproduce a pod run.
  c.data.input_processes = 0
  c.data.augment = 'randaugment'
  c.data.randaug_layers = 2
  # 'official': what google/automl computes, wraparounds included (Solarize
  # inverts everything at magnitude 10, 20, 30; Posterize keeps 1 bit from
  # 22.5 on; CutMix labels use the batch-mean pasted fraction). 'intended':
  # those ops as their names read (no wraparound; each example's own CutMix
  # fraction). data/augment_ops.py and data/mix.py.
  c.data.augment_semantics = 'official'

  c.data.normalization = ''  # '': the architecture's ('inception'/'imagenet')

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 350.0
  c.train.total_steps = 0  # >0: run length in steps (overrides epochs)
  c.train.batch_size = 4096
  c.train.label_smoothing = 0.1
  # 'softmax'; 'sigmoid' (official: mean over batch and classes);
  # 'sigmoid_sum' (summed over classes, the official 'custom' loss).
  c.train.loss = 'softmax'
  c.train.normalize_labels = False  # multi-hot labels sum to 1 (21k)
  # Examples per epoch for the stage plan and the schedule; 0: the train
  # split's size. The ImageNet-1k configs set IMAGENET_OFFICIAL_TRAIN_IMAGES.
  c.train.epoch_examples = 0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'rmsprop_tf1'
  c.optimizer.weight_decay = 1e-5  # L2 on kernels only
  c.optimizer.decay = 0.9
  c.optimizer.momentum = 0.9
  # 0: the update rule's own, as TF1: RMSProp 1e-3, Adam 1e-8.
  c.optimizer.epsilon = 0.0

  c.schedule = ml_collections.ConfigDict()
  c.schedule.lr_per_256 = 0.016  # 0.256 at batch 4096
  c.schedule.kind = 'exponential'
  c.schedule.warmup_epochs = 5.0
  c.schedule.decay_epochs = 2.4
  c.schedule.decay_rate = 0.97
  # Floor after decay, per 256 images like lr_per_256 (official lr_min).
  c.schedule.min_lr_per_256 = 0.0

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.9999  # 0 disables the EMA copy
  c.ema.ramp = True  # min(decay, (1 + t) / (10 + t))

  c.progressive = ml_collections.ConfigDict()
  c.progressive.preset = 'paper'
  c.progressive.num_stages = 4
  c.progressive.size_rule = 'linear'
  c.progressive.min_image_size = 128
  c.progressive.max_image_size = 0  # 0: the architecture's train size
  c.progressive.randaug_magnitude = (5.0, 15.0)
  c.progressive.mixup_alpha = (0.0, 0.0)
  c.progressive.cutmix_alpha = (0.0, 0.0)
  c.progressive.dropout_rate = (0.1, 0.3)
  c.progressive.batch_size_rule = 'constant'  # or 'constant_memory'
  c.progressive.max_batch_size = 0  # cap for 'constant_memory'; 0: none
  # 'linear': the paper's fixed ramp. 'feedback': each stage's level of the
  # ramps above (and its size, from the linear plan's ladder) set from the
  # last stages' clean-train vs holdout accuracy (training/feedback.py);
  # needs data.holdout.
  c.progressive.controller = 'linear'
  c.progressive.feedback = ml_collections.ConfigDict()
  c.progressive.feedback.hold_gap = 0.02  # gap at or below: held
  c.progressive.feedback.target_gap = 0.05  # the gap of one linear step
  c.progressive.feedback.growth_gain = 1.0  # faster when the gap grows
  c.progressive.feedback.max_speedup = 3.0  # at most, in linear steps

  c.eval = ml_collections.ConfigDict()
  c.eval.image_size = 0  # 0: the architecture's eval size
  c.eval.batch_size = 1024
  c.eval.every_steps = 5000  # 0: only at stage ends and at the end
  c.eval.at_stage_end = True

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.asynchronous = True

  # Fine-tuning: start from a converted or pretrained checkpoint.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = config_dict.placeholder(str)
  c.init_from.prefer_ema = True
  c.init_from.required = False  # fine-tuning configs: fail if path is unset

  # Stacked self-distillation (effnetv2_jax/distill): the model's features
  # at the taps trained toward a second extractor stacked on them.
  c.distill = ml_collections.ConfigDict()
  c.distill.mode = 'off'  # off | stacked | label_heads (the ablation)
  c.distill.taps = ('auto',)  # feature names; auto: the last feature map
  c.distill.kind = 'auto'  # mbconv | fused_mbconv | transformer | mixer
  c.distill.extractor = 'auto'  # a catalogue name, or chosen by the budget
  c.distill.weight = 1.0  # the distance's weight (lambda)
  c.distill.head_weight = 1.0  # the task loss of the extractor's head
  c.distill.distance = 'l2'  # l2 | cosine, normalised per tap
  c.distill.second = 'joint'  # joint | frozen (the extractor keeps its init)
  # A self-distillation run's workdir (or checkpoint) to start the second
  # extractors from: a pretrained target, e.g. with second='frozen'.
  c.distill.init_from = config_dict.placeholder(str)
  c.distill.budget = ml_collections.ConfigDict()
  c.distill.budget.max_memory_mb = 0.0  # extra training memory; 0: none
  c.distill.budget.max_mmacs = 0.0  # extra MACs per image (millions)
  # A floor on the holdout top-1 of a short trial per candidate: measured by
  # `python -m effnetv2_jax.distill` (a run with extractor='auto' refuses it).
  c.distill.budget.min_accuracy = 0.0  # 0: none
  c.distill.budget.trial_epochs = 5.0  # each accuracy trial's length

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1
  c.mesh.fsdp_min_size = 0  # shard state arrays with >= this many elements

  c.log_every_steps = 100
  # Persistent XLA compilation cache; a restarted job reuses its compiles.
  # Unset: workdir/compilation_cache for a local workdir (none for a remote
  # one; name a directory there); '' turns it off.
  c.compilation_cache_dir = config_dict.placeholder(str)
  # At the end, write the (EMA) weights as a model directory, workdir/model,
  # which `effnetv2_jax.models.weights.load_model` and fine-tuning read.
  c.export_model = True
  # Compile later stages' steps ahead of time: on a background thread while
  # training (CPU, TPU), or all before the first step on GPUs, where a compile
  # beside training slowed the steps 4-10x (trainer.compile_beside_training).
  c.compile_ahead = True
  c.progress_bar = 'auto'  # 'auto': a tqdm bar when stderr is a terminal
  return c


def apply_finetune_recipe(c: ml_collections.ConfigDict, variant: str,
                          preset: str) -> ml_collections.ConfigDict:
  """Fine-tuning from pretrained weights (paper Sec. 5.2-5.3), both presets.

  Shared: batch 512, learning rate 0.001 (0.0005 per 256), one warmup
  epoch, the 'ft' augmentation (whole-image resize, flip, noise cutout) and
  normalisation, EMA 0.9996, label smoothing 0.1, dropout 1e-6, stochastic
  depth 0.2, no progressive stages, training at the eval size, initialised
  from the pretrained EMA weights with the head re-initialised when the class
  count differs. 'paper': cosine decay, no weight decay (the paper's transfer
  setup, Sec. 5.3).
  'official': constant rate, L2 1e-5 (`ImagenetFt` in google/automl).
  """
  variant = arch_lib.normalize_variant_name(variant)
  if preset not in PRESETS:
    raise ValueError(f'preset must be one of {PRESETS}, got {preset!r}')
  arch = arch_lib.get_architecture(variant)
  c.model.arch = variant
  c.data.augment = 'ft'
  c.data.normalization = 'ft'
  c.train.batch_size = 512
  c.schedule.lr_per_256 = 0.0005
  c.schedule.warmup_epochs = 1.0
  c.ema.decay = 0.9996
  c.init_from.required = True
  c.init_from.prefer_ema = True
  p = c.progressive
  p.preset = preset
  p.num_stages = 1
  p.min_image_size = p.max_image_size = arch.eval_size
  p.randaug_magnitude = (0.0, 0.0)
  p.mixup_alpha = p.cutmix_alpha = (0.0, 0.0)
  p.dropout_rate = (1e-6, 1e-6)
  if preset == 'paper':
    c.schedule.kind = 'cosine'
    c.optimizer.weight_decay = 0.0
  else:
    c.schedule.kind = 'constant'
    c.optimizer.weight_decay = 1e-5
  return c


def apply_imagenet_recipe(c: ml_collections.ConfigDict, variant: str,
                          preset: str) -> ml_collections.ConfigDict:
  """Sets model, progressive and augmentation keys of one ImageNet recipe.

  'paper': Table 6 (sizes linspace(128, max), RandAugment 5 -> max, mixup
  0 -> max, dropout 0.1 -> max). B0-B3 have no Table 6 column; the paper
  (Table 11) trained them without progressive learning, so 'paper' gives them
  one stage at the train size with AutoAugment, their official augmentation.

  'official': google/automl main.py (sizes int(128 + (train - 128)(k+1)/4),
  RandAugment linspace(5, max, 4), mixup = CutMix = linspace(0, alpha, 4),
  dropout fixed at the variant's value; B0-B3 AutoAugment with the size
  stages only).
  """
  variant = arch_lib.normalize_variant_name(variant)
  if preset not in PRESETS:
    raise ValueError(f'preset must be one of {PRESETS}, got {preset!r}')
  arch = arch_lib.get_architecture(variant)
  c.model.arch = variant
  c.progressive.preset = preset
  # The official TPU BatchNorm averages moments over groups of 8 replicas;
  # the paper preset uses plain global-batch BN (what jit gives for free).
  c.model.bn_replicas_per_group = -1 if preset == 'official' else 0
  p = c.progressive
  p.min_image_size = PAPER_MIN['image_size']
  if variant.startswith('b'):
    c.data.augment = 'autoaugment'
    p.randaug_magnitude = (0.0, 0.0)
    p.mixup_alpha = p.cutmix_alpha = (0.0, 0.0)
    p.dropout_rate = (arch.dropout_rate, arch.dropout_rate)
    p.max_image_size = arch.train_size
    if preset == 'paper':
      p.num_stages = 1
      p.size_rule = 'linear'
    else:
      p.num_stages = 4
      p.size_rule = 'official'
    return c
  c.data.augment = 'randaugment'
  if preset == 'paper':
    size, ra, mix, drop = PAPER_TABLE6[variant]
    p.num_stages = 4
    p.size_rule = 'linear'
    p.max_image_size = size
    p.randaug_magnitude = (PAPER_MIN['randaug'], ra)
    p.mixup_alpha = (PAPER_MIN['mixup'], mix)
    p.cutmix_alpha = (0.0, 0.0)
    p.dropout_rate = (PAPER_MIN['dropout'], drop)
  else:
    p.num_stages = 4
    p.size_rule = 'official'
    p.max_image_size = arch.train_size
    p.randaug_magnitude = (PAPER_MIN['randaug'], OFFICIAL_RANDAUG[variant])
    mix = OFFICIAL_MIX[variant]
    p.mixup_alpha = (0.0, mix)
    p.cutmix_alpha = (0.0, mix)
    p.dropout_rate = (arch.dropout_rate, arch.dropout_rate)
  return c


CONTROLLERS = ('linear', 'feedback')


def apply_controller(c: ml_collections.ConfigDict, controller: str, *,
                     holdout=0.02) -> None:
  """Selects config.progressive.controller; 'feedback' also carves a
  holdout from train (`holdout`: a fraction or a count) when the config has
  none, since its decisions are taken on one."""
  if controller not in CONTROLLERS:
    raise ValueError(f'unknown controller {controller!r}; choose one of '
                     f'{", ".join(CONTROLLERS)}')
  c.progressive.controller = controller
  if controller == 'feedback' and not c.data.holdout:
    c.data.holdout = holdout


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'s,official' or 'variant=s,preset=official' -> ConfigDict of strings.

  Positional tokens fill the keys of `defaults` in order; `key=value`
  tokens name them. Unknown keys fail with the list of known ones.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  keys = list(defaults)
  position = 0
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if '=' in token:
      key, value = token.split('=', 1)
    else:
      if position >= len(keys):
        raise ValueError(f'too many config arguments in {arg!r}; known: '
                         f'{", ".join(keys) or "none (it takes no argument)"}')
      key, value = keys[position], token
      position += 1
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r} in {arg!r}; known: '
                       f'{", ".join(keys)}')
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out
