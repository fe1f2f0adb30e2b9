"""Paper Table 7's parameters and FLOPs, beside ours.

    python -m effnetv2_jax.tables params [--json | --markdown] [--no-xla]
                                         [--variant s --variant b0]

prints, for each variant, the trainable parameter count beside the official
one, and the multiply-accumulates at the train and eval sizes counted from the
architecture (`models/macs.py`) beside the reference figures of
`arch.REFERENCE_GMACS`, which that count reproduces to their printed digits.

XLA's count of the compiled inference program is printed beside them as a
cross-check (skip it with `--no-xla`: it compiles every variant twice). It
differs by design: XLA counts only the kernel taps that land inside the image
(padding taps are free) and counts the element-wise work as well (BN, SiLU,
the SE pooling and gate, residual adds). The table splits the difference into
those two parts: the padding share comes from `count_macs(...,
padding_taps=False)`, and what is left is XLA's element-wise count.

XLA's cost analysis gives custom calls no cost, so the count compiles a model
whose every convolution is an XLA op: on CPU the oneDNN convolutions
(`conv_impl='auto'`, and eval-mode 1x1 convolutions on large maps) are custom
calls, and on GPU cuDNN's are, so it always compiles for the CPU backend
(its inputs placed on `jax.devices('cpu')`), whatever the default device.
"""

from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.models import count_params, create_model
from effnetv2_jax.models import macs as macs_lib
from effnetv2_jax.models.arch import Architecture


def xla_macs(architecture: Architecture | str, image_size: int,
             num_classes: int = 1000) -> float:
  """MACs of one eval-mode forward pass at batch 1, as XLA counts them.

  The cost analysis of the compiled CPU program, flops / 2, with every
  convolution compiled by XLA.

  Raises:
    RuntimeError: the compiled program still holds custom calls, which XLA
      does not cost, so the count would be short.
  """
  model = nnx.eval_shape(
      lambda: create_model(architecture, num_classes, conv_impl='xla'))
  graphdef, state = nnx.split(model)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x, training=False)

  # On CPU whatever the default backend: a GPU program's cuDNN convolutions
  # are custom calls too.
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), state)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32,
                           sharding=cpu)
  compiled = jax.jit(forward).lower(state, x).compile()
  targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"',
                                  compiled.as_text())))
  if targets:
    raise RuntimeError('XLA gives custom calls no cost and the program holds '
                       f'{", ".join(targets)}; its count would be short')
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost['flops']) / 2


def macs_row(architecture: Architecture, image_size: int,
             official_gmacs: float, *, with_xla: bool) -> dict:
  """One size's MAC figures for the params table, in G."""
  count = macs_lib.count_macs(architecture, image_size).total
  row = {
      'size': image_size,
      'gmacs': count / 1e9,
      'official_gmacs': official_gmacs,
      'deviation': count / 1e9 / official_gmacs - 1,
  }
  if with_xla:
    inside = macs_lib.count_macs(architecture, image_size,
                                 padding_taps=False).total
    xla = xla_macs(architecture, image_size)
    row.update({
        'xla_gmacs': xla / 1e9,
        'xla_deviation': xla / count - 1,
        'xla_padding_share': inside / count - 1,
        'xla_elementwise_share': (xla - inside) / count,
    })
  return row


def params_table(variants, *, with_xla: bool = True) -> list[dict]:
  """One row per variant: parameters, and MACs at the train and eval sizes."""
  rows = []
  for name in variants:
    a = arch_lib.get_architecture(name)
    model = nnx.eval_shape(lambda: create_model(a, 1000))
    official_train, official_eval = arch_lib.REFERENCE_GMACS[a.name]
    rows.append({
        'variant': a.name,
        'params': count_params(model),
        'official_params': arch_lib.OFFICIAL_PARAMS[a.name],
        'train': macs_row(a, a.train_size, official_train, with_xla=with_xla),
        'eval': macs_row(a, a.eval_size, official_eval, with_xla=with_xla),
        'paper': arch_lib.PAPER_FIGURES[a.name],
    })
    if with_xla:
      print(f'  counted {a.name}', file=sys.stderr, flush=True)
  return rows


def _gmacs(value: float) -> str:
  return f'{value:.3f}' if value < 10 else f'{value:.2f}'


def _percent(fraction: float) -> str:
  return f'{round(fraction * 100, 2) + 0.0:+.2f}%'  # + 0.0: no '-0.00%'


def _ours(m: dict) -> str:
  return (f'{_gmacs(m["gmacs"])} / {m["official_gmacs"]:g} @{m["size"]} '
          f'({_percent(m["deviation"])})')


def _xla(m: dict) -> str:
  return (f'{_gmacs(m["xla_gmacs"])} ({_percent(m["xla_deviation"])} = '
          f'{_percent(m["xla_padding_share"])} '
          f'{_percent(m["xla_elementwise_share"])})')


NOTE = ('GMACs: ours = counted from the architecture (models/macs.py: '
        'convolutions with every kernel tap, SE, classifier) / official '
        'reference (arch.REFERENCE_GMACS) @ image size.')
XLA_NOTE = ('XLA = cost analysis of the compiled CPU inference program with '
            'XLA convolutions (batch 1, float32) / 2, vs ours = padding taps '
            'XLA does not count + element-wise work (BN, SiLU, SE pool and '
            'gate, adds) it does.')


def format_params_table(rows) -> str:
  """The rows as a fixed-width text table."""
  with_xla = 'xla_gmacs' in rows[0]['train']
  header = (f'{"variant":<8}{"params":>13}{"official":>13}  '
            f'{"GMACs train: ours / official":<34}'
            f'{"GMACs eval: ours / official":<34}')
  if with_xla:
    header += f'{"XLA train (vs ours)":<34}{"XLA eval (vs ours)":<34}'
  header += 'paper'
  lines = [header, '-' * len(header)]
  for r in rows:
    mark = '' if r['params'] == r['official_params'] else '  MISMATCH'
    line = (f'{r["variant"]:<8}{r["params"]:>13,}{r["official_params"]:>13,}'
            f'  {_ours(r["train"]):<34}{_ours(r["eval"]):<34}')
    if with_xla:
      line += f'{_xla(r["train"]):<34}{_xla(r["eval"]):<34}'
    lines.append(line + r['paper'] + mark)
  lines.append(NOTE)
  if with_xla:
    lines.append(XLA_NOTE)
  return '\n'.join(lines)


def format_params_markdown(rows) -> str:
  """The rows as the README's markdown table."""
  with_xla = 'xla_gmacs' in rows[0]['train']
  header = ('| variant | params (ours = official) | GMACs train: ours / '
            'official @size | GMACs eval: ours / official @size |')
  rule = '|---|---|---|---|'
  if with_xla:
    header += (' XLA train (vs ours = padding + element-wise) |'
               ' XLA eval (vs ours = padding + element-wise) |')
    rule += '---|---|'
  lines = [header + ' paper |', rule + '---|']
  for r in rows:
    params = f'{r["params"]:,}'
    if r['params'] != r['official_params']:
      params += f' (official {r["official_params"]:,})'
    cells = [r['variant'].upper(), params, _ours(r['train']), _ours(r['eval'])]
    if with_xla:
      cells += [_xla(r['train']), _xla(r['eval'])]
    lines.append('| ' + ' | '.join(cells + [r['paper']]) + ' |')
  return '\n'.join(lines)
