"""MACs counted from the architecture, against the official figures and XLA."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from effnetv2_jax import tables
from effnetv2_jax.models import arch, macs

SIZES = [(v, which) for v in arch.VARIANTS for which in ('train', 'eval')]


def _size(variant, which):
  a = arch.get_architecture(variant)
  return a.train_size if which == 'train' else a.eval_size


def _official(variant, which):
  return arch.REFERENCE_GMACS[variant][0 if which == 'train' else 1]


@pytest.mark.parametrize('variant,which', SIZES)
def test_every_variant_within_one_percent_of_official(variant, which):
  gmacs = macs.count_macs(variant, _size(variant, which)).total / 1e9
  assert gmacs == pytest.approx(_official(variant, which), rel=0.01)


@pytest.mark.parametrize('variant,which', SIZES)
def test_official_figures_reproduced_to_their_printed_digits(variant, which):
  official = _official(variant, which)
  decimals = len(repr(official).split('.')[1])
  gmacs = macs.count_macs(variant, _size(variant, which)).total / 1e9
  assert round(gmacs, decimals) == official


def _tiny():
  # stem 3 -> 8; Fused-MBConv e1 k3 s1 8 -> 8; MBConv e2 k3 s2 8 -> 16 with
  # SE (reduced to int(8 * 0.25) = 2); head 1x1 16 -> 32; 10 classes.
  return arch.Architecture(
      name='tiny', head_channels=32, stages=(
          arch.StageSpec(1, 3, 1, 1, 8, 8, fused=True),
          arch.StageSpec(1, 3, 2, 2, 8, 16, se_ratio=0.25)))


def test_tiny_architecture_by_hand():
  count = macs.count_macs(_tiny(), 8, num_classes=10)
  assert count.as_dict() == {
      'stem': 4 * 4 * 9 * 3 * 8,         # 8 px -> 4 x 4, 3x3 taps, 3 -> 8
      'expand': 4 * 4 * 9 * 8 * 8        # the fused 3x3 conv, 8 -> 8
                + 4 * 4 * 8 * 16,        # MBConv's 1x1 expand on 4 x 4
      'depthwise': 2 * 2 * 9 * 16,       # stride 2: 2 x 2 outputs, 16 channels
      'se': 2 * 16 * 2 + 2 * 2 * 16,     # 16 -> 2 -> 16, gate per element
      'project': 2 * 2 * 16 * 16,
      'head': 2 * 2 * 16 * 32,
      'classifier': 32 * 10,
      'blocks': 9216 + 2048 + 576 + 128 + 1024,
      'total': 3456 + 9216 + 2048 + 576 + 128 + 1024 + 2048 + 320,
  }


def test_tiny_architecture_without_padding_taps_by_hand():
  count = macs.count_macs(_tiny(), 8, num_classes=10, padding_taps=False)
  # 'SAME' pads 8 px at stride 2 by (0, 1): the last output row sees 2 of 3
  # kernel rows, so 3 + 3 + 3 + 2 = 11 taps per dimension. The stride-1 3x3
  # on 4 x 4 pads (1, 1): 2 + 3 + 3 + 2 = 10. The stride-2 depthwise on 4 x 4
  # pads (0, 1): 3 + 2 = 5.
  assert count.stem == 11 * 11 * 3 * 8
  assert count.expand == 10 * 10 * 8 * 8 + 4 * 4 * 8 * 16
  assert count.depthwise == 5 * 5 * 16
  full = macs.count_macs(_tiny(), 8, num_classes=10)
  assert (count.se, count.project, count.head, count.classifier) == (
      full.se, full.project, full.head, full.classifier)


def _xla_conv_macs(size, kernel, stride, channels, depthwise):
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  w = jax.ShapeDtypeStruct(
      (kernel, kernel, 1 if depthwise else channels, channels), jnp.float32)

  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=channels if depthwise else 1)

  cost = jax.jit(conv).lower(x, w).compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return cost['flops'] / 2


@pytest.mark.parametrize('size,kernel,stride,depthwise', [
    (12, 3, 1, False), (12, 3, 2, False), (13, 3, 2, False),
    (7, 5, 2, True), (10, 3, 1, True), (9, 1, 2, False)])
def test_taps_inside_the_image_are_what_xla_counts(size, kernel, stride,
                                                   depthwise):
  ours = macs.conv_macs(size, kernel, stride, 8, 8, depthwise=depthwise,
                        padding_taps=False)
  assert _xla_conv_macs(size, kernel, stride, 8, depthwise) == ours


_CROSS_CHECK = """
import json
from effnetv2_jax import tables
from effnetv2_jax.models import arch, macs
tiny = arch.scaled(arch.get_architecture('b0'), width=0.25, depth=0.25,
                   head_channels=64)
print(json.dumps([tables.xla_macs(tiny, 192, 10),
                  macs.count_macs(tiny, 192, 10).total,
                  macs.count_macs(tiny, 192, 10, padding_taps=False).total]))
"""


def test_xla_cross_check_on_a_tiny_model_in_a_one_device_process():
  # One CPU device, as `python -m effnetv2_jax.tables` runs: only there do
  # oneDNN custom calls (which XLA gives no cost) enter the program; this
  # session's eight fake devices keep them out. At 192 px the 1x1
  # projection after the second stage works on 48 x 48 maps, enough rows
  # for the eval-mode oneDNN route.
  flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                   if 'xla_force_host_platform_device_count' not in f)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags)
  out = subprocess.run([sys.executable, '-c', _CROSS_CHECK], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  xla, ours, inside = json.loads(out.stdout.strip().splitlines()[-1])
  assert inside < ours
  # XLA = ours - padding taps + element-wise work (BN, SiLU, SE, adds): the
  # element-wise part is positive and a few percent of a narrow network.
  assert 0 < (xla - inside) / ours < 0.15


def test_tables_cli_without_xla(capsys):
  assert tables.main(['params', '--json', '--no-xla', '--variant', 'B0',
                      '--variant', 'efficientnetv2-s']) == 0
  rows = json.loads(capsys.readouterr().out)
  assert [r['variant'] for r in rows] == ['b0', 's']
  for r in rows:
    assert r['params'] == r['official_params']
    for which in ('train', 'eval'):
      assert abs(r[which]['deviation']) < 1e-3
      assert 'xla_gmacs' not in r[which]
  assert tables.main(['params', '--markdown', '--no-xla', '--variant',
                      'b0']) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[2].startswith('| B0 | 7,139,704 | 0.529 / 0.529 @192 (+0.02%)')


def test_bad_input_is_named():
  with pytest.raises(ValueError, match='image_size'):
    macs.count_macs('s', 0)
  with pytest.raises(ValueError, match='num_classes'):
    macs.count_macs('s', 384, num_classes=0)
  with pytest.raises(ValueError, match='unknown EfficientNetV2 variant'):
    macs.count_macs('b9', 224)
  with pytest.raises(TypeError, match='variant name or an Architecture'):
    macs.count_macs(3.0, 224)
