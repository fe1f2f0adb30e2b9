"""Tables about the model family, printed from the code itself.

    python -m effnetv2_jax.tables params [--json] [--variant s --variant b0]

prints, for each variant, the trainable parameter count (and the official
figure), and the multiply-accumulates at the train and eval sizes counted by
XLA from the compiled inference program on CPU, beside the reference count of
facts §2.2 and the paper's figure.

XLA's convention differs slightly from the hand formula: a convolution only
counts kernel taps that land inside the image (taps over 'SAME' padding are
free) and element-wise ops (BN, SiLU, adds) are counted too; the two effects
nearly cancel at the train and eval sizes. GPU executables do not count cuDNN
convolutions, hence counting on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def count_macs(variant: str, image_size: int) -> float:
  """MACs of one eval-mode forward pass at batch 1, as XLA counts them."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from effnetv2_jax.models import create_model

  # The 'xla' depthwise form is one convolution op, counted like the
  # reference; the shifted CPU form would add the padding taps back.
  abstract = nnx.eval_shape(
      lambda: create_model(variant, 1000, conv_impl='xla'))
  graphdef, state = nnx.split(abstract)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x, training=False)

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  compiled = jax.jit(forward).lower(state, x).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost['flops']) / 2


def params_table(variants) -> list[dict]:
  from flax import nnx

  from effnetv2_jax.models import arch, count_params, create_model

  rows = []
  for name in variants:
    a = arch.get_architecture(name)
    model = nnx.eval_shape(lambda: create_model(a, 1000))
    params = count_params(model)
    ref_train, ref_eval = arch.REFERENCE_GMACS[a.name]
    row = {
        'variant': a.name,
        'params': params,
        'official_params': arch.OFFICIAL_PARAMS[a.name],
        'train_size': a.train_size,
        'eval_size': a.eval_size,
        'gmacs_train': count_macs(a.name, a.train_size) / 1e9,
        'gmacs_eval': count_macs(a.name, a.eval_size) / 1e9,
        'reference_gmacs_train': ref_train,
        'reference_gmacs_eval': ref_eval,
        'paper': arch.PAPER_FIGURES[a.name],
    }
    row['gmacs_train_deviation'] = row['gmacs_train'] / ref_train - 1
    row['gmacs_eval_deviation'] = row['gmacs_eval'] / ref_eval - 1
    rows.append(row)
    print(f'  counted {a.name}', file=sys.stderr, flush=True)
  return rows


def format_params_table(rows) -> str:
  header = (f'{"variant":<8}{"params":>13}{"official":>13}  '
            f'{"GMACs train (size, vs ref)":<30}{"GMACs eval (size, vs ref)":<30}'
            f'paper')
  lines = [header, '-' * len(header)]
  for r in rows:
    train = (f'{r["gmacs_train"]:.3f} @{r["train_size"]} '
             f'({r["gmacs_train_deviation"]:+.2%})')
    evals = (f'{r["gmacs_eval"]:.3f} @{r["eval_size"]} '
             f'({r["gmacs_eval_deviation"]:+.2%})')
    mark = '' if r['params'] == r['official_params'] else '  MISMATCH'
    lines.append(f'{r["variant"]:<8}{r["params"]:>13,}{r["official_params"]:>13,}'
                 f'  {train:<30}{evals:<30}{r["paper"]}{mark}')
  lines.append('MACs: XLA cost analysis of the compiled CPU inference program '
               '(batch 1, float32) / 2; ref = facts §2.2 (convs + SE + FC).')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m effnetv2_jax.tables',
      description='Parameter and MAC tables of the EfficientNetV2 family.')
  parser.add_argument('table', choices=['params'])
  parser.add_argument('--json', action='store_true', help='print JSON rows')
  parser.add_argument('--variant', action='append',
                      help='restrict to these variants (repeatable)')
  args = parser.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from effnetv2_jax.models import arch
  try:
    variants = [arch.normalize_variant_name(v)
                for v in (args.variant or arch.VARIANTS)]
  except ValueError as e:
    parser.error(str(e))
  rows = params_table(variants)
  print(json.dumps(rows, indent=1) if args.json else format_params_table(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
