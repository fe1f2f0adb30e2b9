"""The published figures the tables print beside ours.

Tan & Le 2021 (EfficientNetV2, ICML) prints its tables as images, so the
figures here are transcriptions. Each carries how far it was checked, and the
tables print that tag beside it:

  checked      two independent transcriptions, or the paper's own text, agree
  transcribed  one transcription of the table
  recalled     checked against no text of the paper: unverified, confirm it
               against the PDF before relying on it
  README       not in the paper: google/automl's efficientnetv2 README

They are kept here, apart from the recipes (`training/recipes.py`) that were
written from them, so that a table compares a config with the paper rather
than with itself.
"""

from __future__ import annotations

import dataclasses

CHECKED = 'checked'
TRANSCRIBED = 'transcribed'
RECALLED = 'recalled'
README = 'README'

TAG_MEANINGS = {
    CHECKED: 'two transcriptions or the paper text agree',
    TRANSCRIBED: 'one transcription',
    RECALLED: 'unverified against the paper',
    README: 'google/automl README, not the paper',
}


def tag_note(tags) -> str:
  """The legend of the tags a table printed."""
  used = [t for t in TAG_MEANINGS if t in set(tags)]
  return 'Paper figures: ' + '; '.join(f'[{t}] {TAG_MEANINGS[t]}'
                                       for t in used) + '.'


@dataclasses.dataclass(frozen=True)
class FusedRow:
  """Table 3: EfficientNet-B4 with stages 1..n in Fused-MBConv."""

  fused_stages: int  # 0: the plain B4
  params_m: float
  flops_b: float  # multiply-adds, at 380 px
  top1: float
  tpu_img_s: float  # training, TPUv3, per core
  v100_img_s: float  # training, per V100


TABLE3 = (
    FusedRow(0, 19.3, 4.5, 82.8, 262, 155),
    FusedRow(3, 20.0, 7.5, 83.1, 362, 216),
    FusedRow(5, 43.4, 21.3, 83.1, 327, 223),
    FusedRow(7, 132.0, 34.4, 81.7, 254, 206),
)
TABLE3_TAG = CHECKED


@dataclasses.dataclass(frozen=True)
class ProgressiveColumn:
  """Table 6: (first stage, last stage) of each progressive setting."""

  image_size: tuple[int, int]
  randaug_magnitude: tuple[float, float]
  mixup_alpha: tuple[float, float]
  dropout_rate: tuple[float, float]
  tag: str


TABLE6 = {
    's': ProgressiveColumn((128, 300), (5, 15), (0, 0), (0.1, 0.3), CHECKED),
    'm': ProgressiveColumn((128, 380), (5, 20), (0, 0.2), (0.1, 0.4),
                           RECALLED),
    'l': ProgressiveColumn((128, 380), (5, 25), (0, 0.4), (0.1, 0.5),
                           RECALLED),
}


@dataclasses.dataclass(frozen=True)
class Top1:
  """A published top-1 (%), and the README's where it differs."""

  value: float
  tag: str
  readme: float | None = None

  def describe(self) -> str:
    text = f'{self.value:g} [{self.tag}]'
    if self.readme is not None:
      text += f' (README {self.readme:g})'
    return text


# Table 7, keyed (pretraining, variant): '1k' trained on ImageNet-1k only,
# '21k' pretrained on ImageNet-21k and fine-tuned on 1k. B0-B3 are not rows
# of Table 7 (Table 11 labels its small models by size); the README gives them.
TABLE7_TOP1 = {
    ('1k', 's'): Top1(83.9, CHECKED),
    ('1k', 'm'): Top1(85.1, CHECKED, readme=85.2),
    ('1k', 'l'): Top1(85.7, CHECKED),
    ('1k', 'b0'): Top1(78.7, README),
    ('1k', 'b1'): Top1(79.8, README),
    ('1k', 'b2'): Top1(80.5, README),
    ('1k', 'b3'): Top1(82.1, README),
    ('21k', 's'): Top1(84.9, CHECKED),
    ('21k', 'm'): Top1(86.2, CHECKED),
    ('21k', 'l'): Top1(86.8, CHECKED, readme=86.9),
    ('21k', 'xl'): Top1(87.3, CHECKED, readme=87.2),
}

# Table 7's training time in hours, 32 TPUv3 cores, the whole progressive
# run (350 epochs).
TABLE7_TRAIN_HOURS = {'s': 7.1, 'm': 13.0, 'l': 24.0}
TABLE7_TRAIN_TAG = CHECKED

# Table 8: transfer from ImageNet-1k weights, top-1 (%) mean and standard
# deviation over 5 runs.
TABLE8 = {
    ('cifar10', 's'): (98.7, 0.04), ('cifar100', 's'): (91.5, 0.11),
    ('flowers', 's'): (97.9, 0.13), ('cars', 's'): (93.8, 0.11),
    ('cifar10', 'm'): (99.0, 0.08), ('cifar100', 'm'): (92.2, 0.08),
    ('flowers', 'm'): (98.5, 0.08), ('cars', 'm'): (94.6, 0.10),
    ('cifar10', 'l'): (99.1, 0.03), ('cifar100', 'l'): (92.3, 0.13),
    ('flowers', 'l'): (98.8, 0.05), ('cars', 'l'): (95.1, 0.10),
}
TABLE8_TAG = TRANSCRIBED
