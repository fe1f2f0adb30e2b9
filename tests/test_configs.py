"""Every experiment config loads, validates and encodes its recipe."""

import glob
import importlib.util
import os
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.training import config_checks
from effnetv2_jax.training import progressive
from effnetv2_jax.training import recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')

# (file, arguments to try). Fine-tuning configs need init_from.path.
VARIANTS = [v + ',' + p for v in arch_lib.VARIANTS for p in recipes.PRESETS]
CASES = {
    'imagenet.py': VARIANTS,
    'imagenet21k.py': [v + ',' + p for v in ('s', 'm', 'l', 'xl')
                       for p in recipes.PRESETS],
    'finetune_21k_to_1k.py': [v + ',' + p for v in ('s', 'm', 'l', 'xl')
                              for p in recipes.PRESETS],
    'transfer.py': [f'{d},{v},{p}' for d in ('cifar10', 'cifar100', 'flowers',
                                             'cars')
                    for v in ('s', 'm', 'l') for p in recipes.PRESETS],
    'digits.py': [None],
    'distill.py': [f'{s},{m}' for s in ('digits', 'vit_digits', 'mixer_digits',
                                        'imagenet_s')
                   for m in ('stacked', 'label_heads', 'plain')],
    'tiny.py': [None, 'cifar10'],
}
# Train-set sizes used to turn epochs into a plan when a config does not set
# train.epoch_examples (the data package's splits; no dataset is read here).
TRAIN_SIZES = {'imagenet2012': 1_255_544, 'imagenet21k': 12_720_275,
               'cifar10': 50_000, 'cifar100': 50_000,
               'oxford_flowers102': 2_040, 'cars196': 8_144, 'digits': 1_437}


def _load(name):
  spec = importlib.util.spec_from_file_location(name[:-3],
                                                os.path.join(CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Search configs (a `search` and a `trial` block): tests/test_nas_driver.py.
SEARCH_CONFIGS = ('nas.py',)


def test_every_config_file_is_covered():
  assert sorted(os.path.basename(p) for p in glob.glob(
      os.path.join(CONFIGS, '*.py'))) == sorted([*CASES, *SEARCH_CONFIGS])


MAIN = 'python -m effnetv2_jax.main'
# The configs that are experiments; tiny.py is a smoke test with no result.
EXPERIMENTS = sorted(set(CASES) - {'tiny.py'})


def _launch_commands(doc):
  """The `python -m effnetv2_jax.main` commands of a docstring, as argv."""
  text = doc.replace('\\\n', ' ')  # join continued lines
  return [shlex.split(line[line.index(MAIN) + len(MAIN):], comments=True)
          for line in text.splitlines() if MAIN in line]


def _expected_paragraph(doc):
  """The docstring's paragraph that starts with 'Expected'."""
  for paragraph in doc.split('\n\n'):
    if paragraph.strip().startswith('Expected'):
      return ' '.join(paragraph.split())
  raise AssertionError('no paragraph starting with "Expected"')


@pytest.mark.parametrize('name', sorted(CASES))
def test_docstring_launch_commands_parse_into_valid_configs(name, tmp_path):
  """Each command the docstring shows is accepted as written."""
  commands = _launch_commands(_load(name).__doc__)
  assert commands, f'{name}: no {MAIN} command in the docstring'
  for argv in commands:
    # main's flags: --workdir (required) and the config with its overrides.
    assert all(arg.startswith(('--workdir=', '--config=', '--config.'))
               for arg in argv), argv
    assert sum(arg.startswith('--workdir=') for arg in argv) == 1, argv
    config_args = [arg for arg in argv if arg.startswith('--config')]
    assert config_args[0].startswith(f'--config=configs/{name}'), argv
    config_args[0] = config_args[0].replace('configs/', CONFIGS + '/', 1)
    config = _parse_command_line(['main'] + config_args)
    if config.init_from.path and '://' not in config.init_from.path:
      config.init_from.path = str(tmp_path)  # the docstring's is a stand-in
    config_checks.validate(config, num_devices=8,
                           reference=recipes.base_config())


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_docstring_states_an_expected_top1(name):
  expected = _expected_paragraph(_load(name).__doc__)
  assert re.search(r'\b\d\d\.\d\b', expected), expected  # a top-1 in %


def test_imagenet_docstring_agrees_with_the_expected_top1_table():
  """configs/imagenet.py and recipes.EXPECTED_TOP1 name the same figures."""
  expected = _expected_paragraph(_load('imagenet.py').__doc__)
  for variant, top1 in recipes.EXPECTED_TOP1.items():
    if top1 is None:
      assert f'{variant.upper()} has no ImageNet-1k' in expected
    else:
      assert f'{variant.upper()} {top1}' in expected, variant


def _plan(config):
  architecture = config_checks.resolve_architecture(config.model.arch)
  prog = config.progressive.to_dict()
  prog['max_image_size'] = prog['max_image_size'] or architecture.train_size
  return progressive.plan_from_config(
      prog, epochs=config.train.epochs,
      num_train_examples=(config.train.epoch_examples
                          or TRAIN_SIZES[config.data.dataset]),
      batch_size=config.train.batch_size, batch_multiple=8,
      total_steps=config.train.total_steps or None), architecture


@pytest.mark.parametrize('name, arg', [(n, a) for n in sorted(CASES)
                                       for a in CASES[n]])
def test_config_validates_and_plans(name, arg, tmp_path):
  config = _load(name).get_config(arg)
  if config.init_from.required:
    config.init_from.path = str(tmp_path)
  config_checks.validate(config, num_devices=8,
                         reference=recipes.base_config())
  plan, architecture = _plan(config)
  eval_size = config.eval.image_size or architecture.eval_size
  config_checks.check_eval_size(eval_size, [s.image_size for s in plan])
  assert plan[-1].end_step > 0
  assert config.experiment != recipes.base_config().experiment


def test_imagenet_presets_follow_table6_and_the_official_code():
  sizes = lambda arg: [s.image_size for s in _plan(
      _load('imagenet.py').get_config(arg))[0]]
  assert sizes('s,paper') == [128, 185, 243, 300]
  assert sizes('s,official') == [171, 214, 257, 300]
  assert sizes('m,paper') == [128, 212, 296, 380]
  assert sizes('l,official') == [192, 256, 320, 384]
  assert sizes('b0,paper') == [192]
  assert sizes('b3,official') == [156, 184, 212, 240]

  paper_l = _plan(_load('imagenet.py').get_config('l,paper'))[0]
  assert [s.randaug_magnitude for s in paper_l][::3] == pytest.approx([5, 25])
  assert [s.mixup_alpha for s in paper_l][::3] == pytest.approx([0, 0.4])
  assert [s.cutmix_alpha for s in paper_l] == [0] * 4
  assert [s.dropout_rate for s in paper_l][::3] == pytest.approx([0.1, 0.5])

  official_m = _load('imagenet.py').get_config('m,official')
  plan = _plan(official_m)[0]
  assert [s.dropout_rate for s in plan] == [0.3] * 4
  assert [s.cutmix_alpha for s in plan] == [s.mixup_alpha for s in plan]
  assert plan[-1].mixup_alpha == pytest.approx(0.2)
  assert official_m.model.bn_replicas_per_group == -1
  # Shared recipe: 350 epochs at 4096, 0.256 peak, EMA, L2, smoothing.
  for arg in ('s,paper', 'm,official'):
    c = _load('imagenet.py').get_config(arg)
    assert (c.train.epochs, c.train.batch_size) == (350, 4096)
    assert c.schedule.lr_per_256 * c.train.batch_size / 256 == pytest.approx(
        0.256)
    assert (c.ema.decay, c.optimizer.weight_decay,
            c.train.label_smoothing) == (0.9999, 1e-5, 0.1)
    assert c.optimizer.name == 'rmsprop_tf1'


def test_finetune_and_transfer_recipes():
  transfer = _load('transfer.py').get_config('cifar100,m,paper')
  assert transfer.data.dataset == 'cifar100'
  assert transfer.train.total_steps == 10_000
  assert transfer.train.batch_size == 512
  assert transfer.schedule.kind == 'cosine'
  assert transfer.optimizer.weight_decay == 0
  (stage,) = _plan(transfer)[0]
  assert stage.image_size == 480  # M's eval size
  official = _load('transfer.py').get_config('cars,s,official')
  assert (official.schedule.kind, official.optimizer.weight_decay) == (
      'constant', 1e-5)
  ft = _load('finetune_21k_to_1k.py').get_config('xl')
  assert ft.model.num_classes == 1000 and ft.init_from.prefer_ema
  with pytest.raises(config_checks.ConfigError, match='init_from.path'):
    config_checks.validate(ft, num_devices=8)


# Configs that reproduce the paper or the official code, by file.
REPRODUCING = ('imagenet.py', 'imagenet21k.py', 'finetune_21k_to_1k.py',
               'transfer.py')


def test_reproducing_presets_use_the_official_arithmetic():
  """data.augment_semantics='official' (the released code's Solarize /
  Posterize wraparounds and CutMix label weights) in every preset that
  claims to reproduce the paper or the official code."""
  for name in REPRODUCING:
    for arg in CASES[name]:
      assert _load(name).get_config(arg).data.augment_semantics == (
          'official'), (name, arg)
  # 350 official epochs of ImageNet-1k: the official step count.
  (*_, last), _ = _plan(_load('imagenet.py').get_config('s,official'))
  assert last.end_step == int(350 * 1_256_144 // 4096)


@pytest.mark.parametrize('key, value, message', [
    ('data.augment_semantics', 'offical',
     "data.augment_semantics='offical': must be one of"),
    ('train.loss', 'sigmoid_mean', "train.loss='sigmoid_mean': must be one"),
    ('schedule.min_lr_per_256', -1.0, 'schedule.min_lr_per_256=-1.0'),
    ('optimizer.epsilon', -1e-8, 'optimizer.epsilon=-1e-08'),
    ('train.epoch_examples', -5, 'train.epoch_examples=-5')])
def test_recipe_keys_fail_in_one_line(key, value, message):
  config = _load('digits.py').get_config(None)
  section, leaf = key.split('.')
  config[section][leaf] = value
  with pytest.raises(config_checks.ConfigError, match=message) as error:
    config_checks.validate(config, num_devices=8,
                           reference=recipes.base_config())
  assert '\n' not in str(error.value)


def test_renamed_min_lr_points_to_the_per_256_key():
  config = _load('digits.py').get_config(None)
  config.schedule.unlock()
  config.schedule.min_lr = 1e-5
  with pytest.raises(config_checks.ConfigError,
                     match='did you mean schedule.min_lr_per_256'):
    config_checks.validate(config, num_devices=8,
                           reference=recipes.base_config())


def test_bad_config_arguments_are_rejected():
  with pytest.raises(ValueError, match='unknown EfficientNetV2 variant'):
    _load('imagenet.py').get_config('s9')
  with pytest.raises(ValueError, match='preset'):
    _load('imagenet.py').get_config('s,fancy')
  with pytest.raises(ValueError, match='transfer dataset'):
    _load('transfer.py').get_config('mnist')
  with pytest.raises(ValueError, match='unknown config argument'):
    _load('imagenet.py').get_config('s,paper,size=3')


def _parse_command_line(argv):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_overrides_reach_the_config():
  """The mechanism of `effnetv2_jax.main`: config_flags with overrides."""
  config = _parse_command_line([
      'main', f'--config={os.path.join(CONFIGS, "imagenet.py")}:m,official',
      '--config.train.batch_size=1024', '--config.model.arch=l',
      '--config.progressive.dropout_rate=(0.2,0.4)',
      '--config.data.data_dir=/data/tfds'])
  assert config.experiment == 'imagenet_m_official'
  assert config.train.batch_size == 1024
  assert config.model.arch == 'l'
  assert tuple(config.progressive.dropout_rate) == (0.2, 0.4)
  assert config.data.data_dir == '/data/tfds'
  # An architecture dict (the quickstart's) can be replaced by a name.
  digits = _parse_command_line([
      'main', f'--config={os.path.join(CONFIGS, "digits.py")}',
      '--config.model.arch=b0'])
  assert digits.model.arch == 'b0'
  # A misspelt key fails (the config is locked).
  with pytest.raises(Exception, match='batchsize'):
    _parse_command_line(['main', f'--config={os.path.join(CONFIGS, "tiny.py")}',
                         '--config.train.batchsize=3'])
