"""Training images/s per variant on the present device, beside the paper's.

    python -m effnetv2_jax.tables speed [--variants s b0] [--batch 2]
                                        [--size 128] [--steps 3]

Each figure is the trainer's own train step (its `TrainTask`'s gradient and
update programs, compiled with the trainer's options, on one device, a
synthetic batch already there), timed as benchmarks/throughput.py times it:
warm-up steps first (the compile is reported apart), then the median of the
timed samples. Defaults: on a CPU only B0 at batch 2 (a minute or two on two
cores); on an accelerator every variant at batch 32. Each variant runs at
its train size unless --size is given.

The paper gives no per-step speed for these models, only Table 7's hours
for the whole 350-epoch progressive run on 32 TPUv3 cores (S, M, L); the
table prints the images/s per core those hours imply, a mean over image
sizes from 128 px up. It is a scale, not a figure this step can match.
"""

from __future__ import annotations

import jax

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.tables import checkout
from effnetv2_jax.tables import layout
from effnetv2_jax.tables import paper
from effnetv2_jax.training import recipes

TPU_CORES = 32
PAPER_EPOCHS = 350


def default_batch() -> int:
  return 2 if jax.default_backend() == 'cpu' else 32


def default_variants() -> tuple[str, ...]:
  return ('b0',) if jax.default_backend() == 'cpu' else arch_lib.VARIANTS


def device_name() -> str:
  kind, backend = jax.devices()[0].device_kind, jax.default_backend()
  return kind if kind.lower() == backend else f'{kind} ({backend})'


def measure_train_step(architecture: arch_lib.Architecture, *, batch: int,
                       size: int, steps: int = 3, warmup: int = 2) -> dict:
  """Images/s of the trainer's train step for `architecture` on the default
  device: `warmup` untimed steps (the first compiles), then `steps` timed
  samples of one step each on a CPU, ten on an accelerator (where a host
  sync per step would show)."""
  harness, workloads = checkout.benchmarks()
  dtype = workloads.resolve_dtype('auto', jax.default_backend())
  runner = workloads.jax_runner(architecture.name, architecture, size=size,
                                batch=batch, mode='train', dtype=dtype)
  per_sample = 1 if jax.default_backend() == 'cpu' else 10
  timing = harness.time_runner(runner, warmup=warmup, repeats=steps,
                               steps_per_sample=per_sample)
  summary = harness.summarize(timing['samples'], batch)
  return {
      'images_per_sec': summary['img_s_median'],
      'images_per_sec_min': summary['img_s_min'],
      'images_per_sec_max': summary['img_s_max'],
      'step_ms': summary['step_ms_median'],
      'compile_s': timing['compile_s'],
      'batch': batch, 'image_size': size, 'dtype': dtype,
      'timed_steps': steps * per_sample, 'device': device_name(),
      'backend': jax.default_backend(),
  }


def architecture_for(name: str) -> arch_lib.Architecture:
  """A variant, or one of the small models benchmarks/workloads.py knows
  (micro, tiny, digits: quick checks)."""
  _, workloads = checkout.benchmarks()
  if name in workloads.SMALL_MODELS:
    return workloads.architecture_for(name)
  try:
    return arch_lib.get_architecture(arch_lib.normalize_variant_name(name))
  except ValueError:
    raise ValueError(
        f'unknown variant {name!r}; choose one of '
        f'{", ".join(arch_lib.VARIANTS + workloads.SMALL_MODELS)}') from None


def paper_images_per_core(variant: str) -> float | None:
  """Images/s per TPUv3 core that Table 7's training hours imply."""
  hours = paper.TABLE7_TRAIN_HOURS.get(variant)
  if hours is None:
    return None
  images = PAPER_EPOCHS * recipes.IMAGENET_OFFICIAL_TRAIN_IMAGES
  return images / (hours * 3600) / TPU_CORES


def rows(variants, *, batch: int, size: int | None, steps: int) -> list[dict]:
  out = []
  for name in variants:
    architecture = architecture_for(name)
    row = {'variant': architecture.name}
    row.update(measure_train_step(architecture, batch=batch,
                                  size=size or architecture.train_size,
                                  steps=steps))
    row['paper_train_hours'] = paper.TABLE7_TRAIN_HOURS.get(architecture.name)
    row['paper_images_per_sec_per_core'] = paper_images_per_core(
        architecture.name)
    out.append(row)
  return out


def _paper(row: dict) -> str:
  if row['paper_train_hours'] is None:
    return '-'
  return (f'{row["paper_train_hours"]:g} h = '
          f'{row["paper_images_per_sec_per_core"]:.0f} img/s/core '
          f'[{paper.TABLE7_TRAIN_TAG}]')


COLUMNS = (
    layout.Column('variant', lambda r: r['variant'].upper()),
    layout.Column('px', lambda r: str(r['image_size']), right=True),
    layout.Column('batch', lambda r: str(r['batch']), right=True),
    layout.Column('dtype', lambda r: r['dtype']),
    layout.Column('ours img/s (min-max)', lambda r: (
        f'{r["images_per_sec"]:.1f} ({r["images_per_sec_min"]:.1f}-'
        f'{r["images_per_sec_max"]:.1f})'), right=True),
    layout.Column('step ms', lambda r: f'{r["step_ms"]:.0f}', right=True),
    layout.Column('compile s', lambda r: f'{r["compile_s"]:.0f}', right=True),
    layout.Column('paper: Table 7 train time on 32 TPUv3 cores', _paper),
)


def notes(table_rows) -> list[str]:
  devices = sorted({r['device'] for r in table_rows})
  out = [f'Ours: the trainer\'s train step on one {", ".join(devices)}, '
         f'median of {table_rows[0]["timed_steps"]} timed steps after '
         'warm-up (compile apart), synthetic batch.',
         'Paper: the whole 350-epoch progressive run (128 px up to the train '
         f'size); img/s/core = 350 x {recipes.IMAGENET_OFFICIAL_TRAIN_IMAGES:,}'
         ' images / time / 32, a mean over sizes: a scale, not comparable '
         'with one fixed-size step.']
  if any(r['backend'] == 'cpu' for r in table_rows):
    out.append('This CPU cannot approach a TPU core: the figure shows the '
               'step runs here, not the paper\'s speed.')
  out.append(paper.tag_note([paper.TABLE7_TRAIN_TAG]))
  return out


def table(table_rows) -> layout.Table:
  return layout.Table(table_rows, COLUMNS, notes(table_rows))
