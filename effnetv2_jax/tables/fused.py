"""Paper Table 3: EfficientNet-B4 with MBConv replaced by Fused-MBConv.

    python -m effnetv2_jax.tables fused [--no-throughput] [--batch 4]
                                        [--size 128] [--steps 3]

Rows: the plain B4 (Tan & Le 2019) and B4 with its first 3, 5 and all 7
block stages in Fused-MBConv ("Fused stage1-3" etc.: stage 1 is the first
block stage after the stem). A fused stage keeps its kernel size, expansion
ratio and layers and, as EfficientNetV2's fused stages and its search space
(`nas.space.SearchSpace.decode`) have it, no squeeze-excite. Parameters are
trainable ones at 1000 classes; MACs are counted from the architecture
(`models/macs.py`) at B4's 380 px, the paper's FLOPs being multiply-adds.

Training throughput is the trainer's step on the present device
(`speed.measure_train_step`), at a small batch and size: on a CPU batch 4 at
128 px (about a minute per row on two cores), elsewhere batch 32 at 380 px.
It is printed beside the paper's TPUv3 and V100 figures as a ratio to the
unfused B4, the comparison that carries over between machines.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.models import count_params, create_model
from effnetv2_jax.models import macs as macs_lib
from effnetv2_jax.tables import layout
from effnetv2_jax.tables import paper
from effnetv2_jax.tables import speed

BACKBONE = 'efficientnet-b4'


def default_batch_and_size() -> tuple[int, int]:
  return (4, 128) if jax.default_backend() == 'cpu' else (32, 380)


def fused_b4(num_fused: int, *, kernel_size: int | None = None,
             squeeze_excite: bool = False) -> arch_lib.Architecture:
  """B4 with block stages 1..num_fused in Fused-MBConv.

  Args:
    num_fused: how many leading block stages to fuse (0 to 7).
    kernel_size: the fused stages' kernel; None keeps each stage's.
    squeeze_excite: keep the stage's squeeze-excite in its fused blocks
      (the paper's Figure 2 draws one; EfficientNetV2's fused stages have
      none).
  """
  b4 = arch_lib.get_architecture(BACKBONE)
  if not 0 <= num_fused <= len(b4.stages):
    raise ValueError(f'num_fused must be in 0..{len(b4.stages)}, got '
                     f'{num_fused!r}')
  stages = tuple(
      dataclasses.replace(
          spec, fused=True, kernel_size=kernel_size or spec.kernel_size,
          se_ratio=spec.se_ratio if squeeze_excite else None)
      if i < num_fused else spec
      for i, spec in enumerate(b4.stages))
  return b4.replace(name=f'{BACKBONE}_fused{num_fused}', stages=stages)


def trainable_params(architecture: arch_lib.Architecture) -> int:
  return count_params(nnx.eval_shape(
      lambda: create_model(architecture, 1000)))


def rows(*, throughput: bool, batch: int | None = None,
         size: int | None = None, steps: int = 3) -> list[dict]:
  default_batch, default_size = default_batch_and_size()
  batch, size = batch or default_batch, size or default_size
  out = []
  for published in paper.TABLE3:
    architecture = fused_b4(published.fused_stages)
    params = trainable_params(architecture)
    gmacs = macs_lib.count_macs(architecture,
                                architecture.eval_size).total / 1e9
    row = {
        'fused_stages': published.fused_stages,
        'params': params,
        'gmacs': gmacs,
        'image_size_macs': architecture.eval_size,
        'paper': dataclasses.asdict(published),
        'paper_tag': paper.TABLE3_TAG,
        'params_deviation': params / 1e6 / published.params_m - 1,
        'gmacs_deviation': gmacs / published.flops_b - 1,
    }
    if throughput:
      row['throughput'] = speed.measure_train_step(
          architecture, batch=batch, size=size, steps=steps)
    out.append(row)
  if throughput:
    base = out[0]['throughput']['images_per_sec']
    for row in out:
      row['throughput']['vs_unfused'] = (
          row['throughput']['images_per_sec'] / base)
  return out


def _name(row: dict) -> str:
  n = row['fused_stages']
  return f'Fused stage1-{n}' if n else 'No fused'


def _versus(ours: str, theirs: float, deviation: float) -> str:
  return f'{ours} / {theirs:.1f} ({layout.signed_percent(deviation)})'


def _paper_speed(rows_, key: str):
  base = rows_[0]['paper'][key]
  return lambda r: f'{r["paper"][key]:g} (x{r["paper"][key] / base:.2f})'


def columns(table_rows) -> list[layout.Column]:
  cols = [
      layout.Column('config', _name),
      layout.Column('params M: ours / paper', lambda r: _versus(
          f'{r["params"] / 1e6:.2f}', r['paper']['params_m'],
          r['params_deviation'])),
      layout.Column('GMACs @380: ours / paper FLOPs', lambda r: _versus(
          f'{r["gmacs"]:.2f}', r['paper']['flops_b'], r['gmacs_deviation'])),
      layout.Column('paper top-1', lambda r: f'{r["paper"]["top1"]:g}%'),
  ]
  if 'throughput' in table_rows[0]:
    cols.append(layout.Column('ours img/s (vs no fused)', lambda r: (
        f'{r["throughput"]["images_per_sec"]:.1f} '
        f'(x{r["throughput"]["vs_unfused"]:.2f})'), right=True))
  cols += [
      layout.Column('paper TPUv3/core', _paper_speed(table_rows, 'tpu_img_s'),
                    right=True),
      layout.Column('paper V100', _paper_speed(table_rows, 'v100_img_s'),
                    right=True),
  ]
  return cols


def notes(table_rows) -> list[str]:
  out = [
      f'Ours: {BACKBONE} with stages 1..n in Fused-MBConv, each keeping its '
      'kernel, expansion and layers, without squeeze-excite (as '
      "EfficientNetV2's fused stages); trainable params at 1000 classes; "
      'GMACs counted from the architecture at 380 px (models/macs.py: every '
      'kernel tap, no element-wise work).',
  ]
  alternative = fused_b4(3, kernel_size=3, squeeze_excite=True)
  out.append(
      'The paper does not say which kernel or squeeze-excite its fused '
      'blocks have, and its rows fit no one choice: with 3x3 fused kernels '
      'and squeeze-excite kept, stage1-3 reads '
      f'{trainable_params(alternative) / 1e6:.2f} M / '
      f'{macs_lib.count_macs(alternative, 380).total / 1e9:.2f} GMACs, '
      'while stage1-5 and stage1-7 fit the kernels kept.')
  if 'throughput' in table_rows[0]:
    t = table_rows[0]['throughput']
    out.append(
        f'Ours img/s: the trainer\'s train step on one {t["device"]}, batch '
        f'{t["batch"]} at {t["image_size"]} px, {t["dtype"]}, median of '
        f'{t["timed_steps"]} timed steps; paper: training throughput on '
        'TPUv3 and V100. Compare the ratios (x vs no fused), not the '
        'figures.')
    if t['backend'] == 'cpu':
      out.append('This hardware cannot match the paper: on a CPU a dense '
                 "k x k convolution costs its FLOPs, so Fused-MBConv's "
                 'extra FLOPs slow training; the paper\'s speed-up comes '
                 'from accelerators running depthwise convolutions far '
                 'below their peak.')
  out.append(paper.tag_note([paper.TABLE3_TAG]))
  return out


def table(table_rows) -> layout.Table:
  return layout.Table(table_rows, columns(table_rows), notes(table_rows))
