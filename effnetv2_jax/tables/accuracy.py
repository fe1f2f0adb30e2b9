"""Paper Tables 7 and 8: the recipe and command per row, the paper's top-1
and ours.

    python -m effnetv2_jax.tables imagenet [--registry results.json]
    python -m effnetv2_jax.tables transfer [--registry results.json]

`imagenet` (Table 7): EfficientNetV2-S/M/L trained on ImageNet-1k
(configs/imagenet.py; B0-B3 beside them with the README's figures) and
S/M/L/XL pretrained on ImageNet-21k then fine-tuned on 1k
(configs/imagenet21k.py, then configs/finetune_21k_to_1k.py). `transfer`
(Table 8): S/M/L fine-tuned from their ImageNet-1k weights on CIFAR-10,
CIFAR-100, Flowers and Cars (configs/transfer.py). Each row is one preset
of our configs ('paper' or 'official'); its recipe summary and workdir
name come from the config itself, and our top-1 from the results registry
(`registry.py`) under the config's experiment name, "not yet run here" where
no run was recorded. In the commands WORKDIR and DATA_DIR stand for your
output and tensorflow_datasets directories.
"""

from __future__ import annotations

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.tables import checkout
from effnetv2_jax.tables import layout
from effnetv2_jax.tables import paper
from effnetv2_jax.training import progressive as progressive_lib
from effnetv2_jax.training import recipes

NOT_RUN = 'not yet run here'
MODEL_NAMES = {'s': 'EfficientNetV2-S', 'm': 'EfficientNetV2-M',
               'l': 'EfficientNetV2-L', 'xl': 'EfficientNetV2-XL',
               'b0': 'EfficientNetV2-B0', 'b1': 'EfficientNetV2-B1',
               'b2': 'EfficientNetV2-B2', 'b3': 'EfficientNetV2-B3'}
IMAGENET_1K = ('s', 'm', 'l', 'b0', 'b1', 'b2', 'b3')
IMAGENET_21K = ('s', 'm', 'l', 'xl')
TRANSFER_VARIANTS = ('s', 'm', 'l')
TRANSFER_DATASETS = ('cifar10', 'cifar100', 'flowers', 'cars')


def recipe(config) -> str:
  """What a config trains, in a few words: length, batch, image sizes."""
  train, p = config.train, config.progressive
  length = (f'{train.total_steps:,} steps' if train.total_steps
            else f'{train.epochs:g} epochs')
  last = (p.max_image_size or
          arch_lib.get_architecture(config.model.arch).train_size)
  sizes = progressive_lib.stage_image_sizes(p.min_image_size, last,
                                            p.num_stages, p.size_rule)
  stages = f'{p.num_stages} stages ' if p.num_stages > 1 else ''
  return (f'{length} at batch {train.batch_size}, '
          f'{stages}{layout.joined(sizes)} px')


def command(config_file: str, arg: str, experiment: str,
            *extra: str) -> str:
  return ' '.join([
      'python -m effnetv2_jax.main', f'--config=configs/{config_file}:{arg}',
      f'--workdir=WORKDIR/{experiment}', *extra])


def _step(config_file: str, arg: str, *extra: str) -> dict:
  """One training run of a row: its config, recipe and command."""
  config = checkout.load_config(config_file, arg)
  return {'config': f'configs/{config_file}:{arg}',
          'experiment': config.experiment, 'recipe': recipe(config),
          'command': command(config_file, arg, config.experiment, *extra)}


def imagenet_rows(runs: dict[str, dict],
                  presets=recipes.PRESETS) -> list[dict]:
  """Table 7's rows; `runs` is the registry (experiment -> run)."""
  out = []
  for pretraining, variants in (('1k', IMAGENET_1K), ('21k', IMAGENET_21K)):
    for variant in variants:
      for preset in presets:
        arg = f'{variant},{preset}'
        if pretraining == '1k':
          steps = [_step('imagenet.py', arg, '--config.data.data_dir=DATA_DIR')]
        else:
          pretrain = _step('imagenet21k.py', arg,
                           '--config.data.data_dir=DATA_DIR_21K')
          steps = [pretrain, _step(
              'finetune_21k_to_1k.py', arg,
              f'--config.init_from.path=WORKDIR/{pretrain["experiment"]}',
              '--config.data.data_dir=DATA_DIR')]
        experiment = steps[-1]['experiment']
        published = paper.TABLE7_TOP1[(pretraining, variant)]
        out.append({
            'model': MODEL_NAMES[variant], 'variant': variant,
            'pretraining': pretraining, 'preset': preset,
            'experiment': experiment, 'steps': steps,
            'paper': {'top1': published.value, 'tag': published.tag,
                      'readme': published.readme},
            'ours': runs.get(experiment),
        })
  return out


def transfer_rows(runs: dict[str, dict],
                  presets=recipes.PRESETS) -> list[dict]:
  """Table 8's rows; `runs` is the registry (experiment -> run)."""
  out = []
  for variant in TRANSFER_VARIANTS:
    for dataset in TRANSFER_DATASETS:
      for preset in presets:
        step = _step('transfer.py', f'{dataset},{variant},{preset}',
                     f'--config.init_from.path=WORKDIR/imagenet_{variant}_'
                     f'{preset}')
        mean, std = paper.TABLE8[(dataset, variant)]
        out.append({
            'model': MODEL_NAMES[variant], 'variant': variant,
            'dataset': dataset, 'preset': preset,
            'experiment': step['experiment'], 'steps': [step],
            'paper': {'top1': mean, 'std': std, 'tag': paper.TABLE8_TAG},
            'ours': runs.get(step['experiment']),
        })
  return out


def _ours_cell(row: dict) -> str:
  run = row['ours']
  if run is None:
    return NOT_RUN
  return f'{run["top1"]:.2f} ({run["weights"]}, {run["date"]})'


def _paper_top1(row: dict) -> str:
  p = row['paper']
  text = f'{p["top1"]:.1f}'
  if 'std' in p:
    text += f' ±{p["std"]:.2f}'
  text += f' [{p["tag"]}]'
  if p.get('readme') is not None:
    text += f' (README {p["readme"]:.1f})'
  return text


def _recipes(row: dict) -> str:
  return ' then '.join(s['recipe'] for s in row['steps'])


def _commands(row: dict) -> str:
  return ' && '.join(s['command'] for s in row['steps'])


def _columns(first: list[layout.Column]) -> list[layout.Column]:
  return first + [
      layout.Column('preset', lambda r: r['preset']),
      layout.Column('recipe', _recipes),
      layout.Column('paper top-1 %', _paper_top1),
      layout.Column('ours top-1 %', _ours_cell),
      layout.Column('command', _commands, below=True, code=True),
  ]


def _notes(table_rows, what: str, registry_path, placeholders: str
           ) -> list[str]:
  done = sum(r['ours'] is not None for r in table_rows)
  return [
      f'Ours: {what}; top-1 from the results registry {registry_path} '
      f'({done} of {len(table_rows)} rows recorded; `python -m '
      'effnetv2_jax.tables record WORKDIR` adds a finished run). '
      f'{placeholders}',
      paper.tag_note([r['paper']['tag'] for r in table_rows]),
  ]


def imagenet_table(table_rows, registry_path) -> layout.Table:
  columns = _columns([
      layout.Column('model', lambda r: r['model']),
      layout.Column('pretraining', lambda r: (
          'ImageNet-1k' if r['pretraining'] == '1k' else '21k -> 1k')),
  ])
  notes = _notes(table_rows, 'the final eval of the last command\'s run, at '
                 'the variant\'s eval size', registry_path,
                 'WORKDIR: your runs\' directory; DATA_DIR, DATA_DIR_21K: '
                 'the tfds directories of ImageNet-1k and -21k.')
  notes.insert(1, 'Paper: Table 7; B0-B3 are not Table 7 '
               'rows, their figures are the README\'s.')
  return layout.Table(table_rows, columns, notes)


def transfer_table(table_rows, registry_path) -> layout.Table:
  columns = _columns([
      layout.Column('model', lambda r: r['model']),
      layout.Column('dataset', lambda r: r['dataset']),
  ])
  notes = _notes(table_rows, 'fine-tuned from our ImageNet-1k run of the '
                 'same preset', registry_path,
                 'WORKDIR: your runs\' directory (the ImageNet-1k runs of '
                 '`python -m effnetv2_jax.tables imagenet` included).')
  notes.insert(1, 'Paper: Table 8, mean ± std of 5 runs, from ImageNet-1k '
               'weights.')
  return layout.Table(table_rows, columns, notes)
