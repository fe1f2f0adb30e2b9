"""The two readings of the official augmentation code (no TensorFlow here).

  'official'  what google/automl's efficientnetv2 code computes, including
              its uint8 wraparounds (Solarize, Posterize above magnitude 10)
              and CutMix labels weighted by the batch-mean pasted fraction.
  'intended'  what those operations are described as doing: no wraparound,
              each CutMix example weighted by its own pasted fraction.

config.data.augment_semantics picks one; `augment_ops` and `mix` say
exactly where they differ.
"""

from __future__ import annotations

OFFICIAL = 'official'
INTENDED = 'intended'
SEMANTICS = (OFFICIAL, INTENDED)


def check(semantics: str) -> None:
  """ValueError naming the choices unless `semantics` is one of them."""
  if semantics not in SEMANTICS:
    raise ValueError(f'augment semantics must be one of {SEMANTICS}, got '
                     f'{semantics!r}')
