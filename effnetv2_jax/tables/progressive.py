"""Paper Table 6: the progressive-learning settings, as our configs plan them.

    python -m effnetv2_jax.tables progressive [--variant s] [--preset paper]

For each variant and preset, configs/imagenet.py's config goes through the
trainer's own planner (`training.progressive.plan_from_config`, with the
config's epochs, epoch size and batch), and the table prints every stage's
image size, RandAugment magnitude, mixup and CutMix alpha, dropout and
length beside Table 6's first- and last-stage values. The last column names
the settings whose first or last stage differs from Table 6: none for the
'paper' preset, by construction; the 'official' preset (google/automl's
main.py) differs as that code does.
"""

from __future__ import annotations

import math

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.tables import checkout
from effnetv2_jax.tables import layout
from effnetv2_jax.tables import paper
from effnetv2_jax.training import progressive as progressive_lib
from effnetv2_jax.training import recipes

CONFIG_FILE = 'imagenet.py'
# Stage field -> Table 6 field, for the comparison.
COMPARED = (('image_size', 'image_size'),
            ('randaug_magnitude', 'randaug_magnitude'),
            ('mixup_alpha', 'mixup_alpha'),
            ('dropout_rate', 'dropout_rate'))


def plan(variant: str, preset: str) -> tuple[progressive_lib.StageSettings,
                                             ...]:
  """The stages the trainer plans for configs/imagenet.py:<variant>,<preset>
  (on one device: a plan at constant batch does not depend on the count)."""
  config = checkout.load_config(CONFIG_FILE, f'{variant},{preset}')
  architecture = arch_lib.get_architecture(config.model.arch)
  settings = config.progressive.to_dict()
  settings['max_image_size'] = (settings['max_image_size'] or
                                architecture.train_size)
  return progressive_lib.plan_from_config(
      settings, epochs=config.train.epochs,
      num_train_examples=config.train.epoch_examples,
      batch_size=config.train.batch_size,
      total_steps=config.train.total_steps or None)


def differences(stages, column: paper.ProgressiveColumn) -> list[str]:
  """The settings whose first or last stage is not Table 6's."""
  out = []
  for ours, theirs in COMPARED:
    first_last = (getattr(stages[0], ours), getattr(stages[-1], ours))
    # The plan interpolates in floats: 0 + 0.2 * 3 / 3 is 0.20000000000000004.
    if not all(math.isclose(a, b, abs_tol=1e-9)
               for a, b in zip(first_last, getattr(column, theirs))):
      out.append(ours)
  return out


def rows(variants=arch_lib.VARIANTS, presets=recipes.PRESETS) -> list[dict]:
  out = []
  for variant in variants:
    column = paper.TABLE6.get(variant)
    for preset in presets:
      stages = plan(variant, preset)
      row = {
          'variant': variant, 'preset': preset,
          'config': f'configs/{CONFIG_FILE}:{variant},{preset}',
          'stages': [s.to_dict() for s in stages],
          'paper': None, 'differs_from_paper': None,
      }
      if column is not None:
        row['paper'] = {ours: list(getattr(column, theirs))
                        for ours, theirs in COMPARED}
        row['paper']['tag'] = column.tag
        row['differs_from_paper'] = differences(stages, column)
      out.append(row)
  return out


def _per_stage(key: str):
  return lambda r: layout.joined([s[key] for s in r['stages']], '.3g')


def _paper(row: dict) -> str:
  p = row['paper']
  if p is None:
    return 'no Table 6 column'
  return (f'{p["image_size"][0]}->{p["image_size"][1]}, '
          f'RA {p["randaug_magnitude"][0]:g}->{p["randaug_magnitude"][1]:g}, '
          f'mixup {p["mixup_alpha"][0]:g}->{p["mixup_alpha"][1]:g}, '
          f'dropout {p["dropout_rate"][0]:g}->{p["dropout_rate"][1]:g} '
          f'[{p["tag"]}]')


def _verdict(row: dict) -> str:
  if row['differs_from_paper'] is None:
    return '-'
  return ', '.join(row['differs_from_paper']) or 'none'


COLUMNS = (
    layout.Column('variant', lambda r: r['variant'].upper()),
    layout.Column('preset', lambda r: r['preset']),
    layout.Column('image size', _per_stage('image_size')),
    layout.Column('RandAugment', _per_stage('randaug_magnitude')),
    layout.Column('mixup', _per_stage('mixup_alpha')),
    layout.Column('CutMix', _per_stage('cutmix_alpha')),
    layout.Column('dropout', _per_stage('dropout_rate')),
    layout.Column('epochs', lambda r: layout.joined(
        [s['end_epoch'] - s['start_epoch'] for s in r['stages']], '.1f')),
    layout.Column('paper Table 6 (first->last)', _paper),
    layout.Column('differs from Table 6', _verdict),
)


def notes(table_rows) -> list[str]:
  return [
      'Ours: one value per stage (/), from configs/imagenet.py through '
      "training.progressive.plan_from_config; 'differs' compares our first "
      'and last stage with Table 6 (size, RandAugment, mixup, dropout).',
      'Table 6 has columns for S, M and L only; the paper preset gives XL '
      "L's, and B0-B3 one stage at the train size (Table 11 trained them "
      'without progressive learning).',
      paper.tag_note([r['paper']['tag'] for r in table_rows if r['paper']]),
  ]


def table(table_rows) -> layout.Table:
  return layout.Table(table_rows, COLUMNS, notes(table_rows))
