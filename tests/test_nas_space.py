"""The NAS search space: every sample decodes to the network the model
builds."""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax.models import arch as arch_lib
from effnetv2_jax.models import create_model
from effnetv2_jax.nas import space as space_lib
from effnetv2_jax.training import state

NUM_CLASSES = 10


def _space(name: str) -> space_lib.SearchSpace:
  return space_lib.SearchSpace(space_lib.backbone(name))


def _se_params(channels: int, reduced: int | None) -> int:
  """Squeeze-excite: 1x1 reduce and 1x1 expand, both with biases."""
  if not reduced:
    return 0
  return channels * reduced + reduced + reduced * channels + channels


def _conv_bn(cin: int, cout: int, kernel: int = 1) -> int:
  """Bias-free convolution, then BatchNorm scale and bias."""
  return kernel * kernel * cin * cout + 2 * cout


def _block_params(block: arch_lib.BlockSpec) -> int:
  cin, cout, k = block.in_channels, block.out_channels, block.kernel_size
  mid = cin * block.expand_ratio
  if block.fused:
    if block.expand_ratio == 1:  # one k x k conv straight to the output
      return _conv_bn(cin, cout, k) + _se_params(cout, block.se_channels)
    return (_conv_bn(cin, mid, k) + _se_params(mid, block.se_channels) +
            _conv_bn(mid, cout))
  expand = _conv_bn(cin, mid) if block.expand_ratio != 1 else 0
  depthwise = k * k * mid + 2 * mid
  return (expand + depthwise + _se_params(mid, block.se_channels) +
          _conv_bn(mid, cout))


def _expected_params(architecture: arch_lib.Architecture,
                     num_classes: int) -> int:
  """Stem, blocks, head conv+BN and the classifier (with bias)."""
  blocks = [b for stage in architecture.stage_blocks() for b in stage]
  stem = _conv_bn(3, architecture.stem_channels, 3)
  head = architecture.head_width
  return (stem + sum(_block_params(b) for b in blocks) +
          _conv_bn(blocks[-1].out_channels, head) +
          head * num_classes + num_classes)


def _check_blocks(space: space_lib.SearchSpace, numbers) -> None:
  """The decoded blocks are the chosen ones on the backbone's channels."""
  backbone = space.backbone
  decoded = space.decode(numbers)
  stages = decoded.stage_blocks()
  assert len(stages) == len(backbone.stages)
  for spec, chosen, blocks in zip(backbone.stages, space.choices(numbers),
                                  stages):
    assert len(blocks) == chosen['layers'] >= 1
    cin = backbone.round_filters(spec.in_channels)
    cout = backbone.round_filters(spec.out_channels)
    fused = chosen['block'] == 'fused_mbconv'
    for j, block in enumerate(blocks):
      assert block.in_channels == (cin if j == 0 else cout)
      assert block.out_channels == cout
      assert block.stride == (spec.stride if j == 0 else 1)
      assert block.kernel_size == chosen['kernel']
      assert block.expand_ratio == chosen['expand']
      assert block.fused == fused
      if fused or space.se_ratio is None:
        assert block.se_channels is None
      else:
        assert block.se_channels == max(
            1, int(block.in_channels * space.se_ratio))
  assert decoded.stem_channels == backbone.stem_channels
  assert decoded.head_width == backbone.head_width


def _corner_samples(space: space_lib.SearchSpace) -> list[list[int]]:
  """Every block type, kernel and expansion on all stages at once, each
  with the fewest and with the most layers."""
  samples = []
  for block, kernel, expand, layers in itertools.product(
      space_lib.BLOCKS, space_lib.KERNELS, space_lib.EXPANSIONS, (0, -1)):
    choices = []
    for stage in range(space.num_stages):
      options = space.decisions[4 * stage + 1].options
      choices.append({'block': block, 'layers': options[layers],
                      'kernel': kernel, 'expand': expand})
    samples.append(space.encode(choices))
  return samples


def test_every_tiny_sample_builds_the_decoded_network():
  space = _space('tiny')
  rng = np.random.default_rng(0)
  samples = _corner_samples(space) + [space.random_numbers(rng)
                                      for _ in range(60)]
  for numbers in samples:
    _check_blocks(space, numbers)
    decoded = space.decode(numbers)
    assert (state.ModelSpec(decoded, NUM_CLASSES).num_params() ==
            _expected_params(decoded, NUM_CLASSES)), space.describe(numbers)


def test_digits_samples_build_the_decoded_network():
  space = _space('digits')
  rng = np.random.default_rng(1)
  for numbers in _corner_samples(space)[::5] + [
      space.random_numbers(rng) for _ in range(8)]:
    _check_blocks(space, numbers)
    decoded = space.decode(numbers)
    assert (state.ModelSpec(decoded, NUM_CLASSES).num_params() ==
            _expected_params(decoded, NUM_CLASSES))


@pytest.mark.parametrize('choice', [
    {'block': 'fused_mbconv', 'kernel': 5, 'expand': 4},
    {'block': 'mbconv', 'kernel': 3, 'expand': 1},
    {'block': 'mbconv', 'kernel': 5, 'expand': 6},
])
def test_decoded_tiny_network_runs_forward(choice):
  space = _space('tiny')
  numbers = space.encode([dict(choice, layers=space.decisions[4 * s + 1]
                               .options[-1])
                          for s in range(space.num_stages)])
  model = create_model(space.decode(numbers), NUM_CLASSES, rngs=0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 24, 24, 3)),
                  jnp.float32)
  logits = model(x, training=False)
  assert logits.shape == (2, NUM_CLASSES)
  assert bool(jnp.all(jnp.isfinite(logits)))


def _backbone_choices(backbone: arch_lib.Architecture) -> list[dict]:
  return [{'block': 'fused_mbconv' if s.fused else 'mbconv',
           'layers': backbone.round_repeats(s.repeats),
           'kernel': s.kernel_size, 'expand': s.expand_ratio}
          for s in backbone.stages]


@pytest.mark.parametrize('name', ['digits', 's', 'b0', 'b3',
                                  'efficientnet-b4'])
def test_backbone_choices_decode_to_the_backbone(name):
  space = _space(name)
  backbone = space.backbone
  decoded = space.decode(space.encode(_backbone_choices(backbone)))
  assert decoded.depth_multiplier == 1.0
  # Width, rounding, head, sizes, normalisation: all the backbone's.
  for field in dataclasses.fields(arch_lib.Architecture):
    if field.name not in ('name', 'stages', 'depth_multiplier'):
      assert (getattr(decoded, field.name) ==
              getattr(backbone, field.name)), field.name
  assert [(s.in_channels, s.out_channels, s.stride) for s in decoded.stages] \
      == [(s.in_channels, s.out_channels, s.stride) for s in backbone.stages]
  assert decoded.stage_blocks() == backbone.stage_blocks()


@pytest.mark.parametrize('name', ['s', 'b3', 'efficientnet-b4'])
def test_backbone_choices_have_the_official_parameter_count(name):
  space = _space(name)
  decoded = space.decode(space.encode(_backbone_choices(space.backbone)))
  assert (state.ModelSpec(decoded, 1000).num_params() ==
          arch_lib.OFFICIAL_PARAMS[name])


def test_layer_options_are_the_scaled_repeats_plus_minus_one_never_zero():
  assert space_lib.layer_options(1) == (1, 2)
  assert space_lib.layer_options(2) == (1, 2, 3)
  assert space_lib.layer_options(15) == (14, 15, 16)
  # EfficientNetV2-S at a quarter depth: ceil(0.25 * (2, 4, 4, 6, 9, 15)).
  layers = [d.options for d in _space('digits').decisions
            if d.field == 'layers']
  assert layers == [(1, 2), (1, 2), (1, 2), (1, 2, 3), (2, 3, 4),
                    (3, 4, 5)]
  for name in ('tiny', 's', 'b3'):
    for decision in _space(name).decisions:
      if decision.field == 'layers':
        assert min(decision.options) >= 1


def test_se_follows_the_backbone_mbconv_stages():
  s = _space('s')
  assert s.se_ratio == 0.25
  stages = s.decode(s.random_numbers(np.random.default_rng(3))).stages
  for stage in stages:
    assert stage.se_ratio == (None if stage.fused else 0.25)
  plain = space_lib.SearchSpace(arch_lib.Architecture(
      name='plain', stages=(arch_lib.parse_block_string('r1_k3_s1_e1_i8_o8'),
                            arch_lib.parse_block_string(
                                'r2_k3_s2_e4_i8_o16_c1'))))
  assert plain.se_ratio is None
  decoded = plain.decode(plain.encode([
      {'block': 'mbconv', 'layers': 1, 'kernel': 3, 'expand': 4}] * 2))
  assert all(stage.se_ratio is None for stage in decoded.stages)
  fused_se = arch_lib.Architecture(
      name='fused_se', stages=(
          arch_lib.parse_block_string('r1_k3_s1_e1_i8_o8_c1_se0.5'),
          arch_lib.parse_block_string('r1_k3_s2_e4_i8_o16_c1')))
  assert space_lib.mbconv_se_ratio(fused_se) == 0.5


def test_paper_space_over_efficientnet_b4_has_36_to_the_7():
  space = _space('efficientnet-b4')
  # B0's repeats (1, 2, 2, 3, 3, 4, 1) at depth 1.8 are all >= 2, so every
  # stage has 2 blocks x 3 layer counts x 2 kernels x 3 expansions.
  assert space.size == 36**7
  layers = [d.options for d in space.decisions if d.field == 'layers']
  assert layers == [(1, 2, 3), (3, 4, 5), (3, 4, 5), (5, 6, 7), (5, 6, 7),
                    (7, 8, 9), (1, 2, 3)]
  assert space.backbone.stem_channels == 48  # 32 x 1.4, rounded to 8


def test_sizes_and_decision_order():
  space = _space('tiny')
  assert [d.name for d in space.decisions] == [
      'stage0.block', 'stage0.layers', 'stage0.kernel', 'stage0.expand',
      'stage1.block', 'stage1.layers', 'stage1.kernel', 'stage1.expand']
  # Stage 0 repeats 1 -> layers (1, 2); stage 1 repeats 2 -> (1, 2, 3).
  assert space.size == (2 * 2 * 2 * 3) * (2 * 3 * 2 * 3)


def test_encode_choices_decode_round_trip():
  space = _space('digits')
  rng = np.random.default_rng(4)
  names = set()
  for _ in range(50):
    numbers = space.random_numbers(rng)
    assert all(0 <= n < len(d.options)
               for n, d in zip(numbers, space.decisions))
    choices = space.choices(numbers)
    assert space.encode(choices) == numbers
    decoded = space.decode(numbers)
    assert [s.repeats for s in decoded.stages] == [c['layers']
                                                   for c in choices]
    assert space.decode(numbers) == decoded  # deterministic, name included
    names.add(decoded.name)
    assert arch_lib.Architecture.from_dict(decoded.to_dict()) == decoded
  assert len(names) > 45  # the name tells samples apart


def test_describe():
  space = _space('digits')
  numbers = space.encode(_backbone_choices(space.backbone))
  assert space.describe(numbers) == (
      'F1k3e1 F1k3e4 F1k3e4 M2k3e4 M3k3e6 M4k3e6')
  assert space.decode(numbers).name.startswith('s_digits_nas_')


@pytest.mark.parametrize('numbers', [
    [0] * 7, [0] * 9, [0, 0, 0, 3, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0, 0, 0],
    [-1, 0, 0, 0, 0, 0, 0, 0], [0.0] * 8, [True] + [0] * 7, '01010101', 3,
])
def test_bad_numbers_are_a_value_error(numbers):
  space = _space('tiny')
  with pytest.raises(ValueError):
    space.decode(numbers)
  with pytest.raises(ValueError):
    space.choices(numbers)


def test_numpy_ints_are_numbers():
  space = _space('tiny')
  numbers = np.array(space.random_numbers(np.random.default_rng(0)))
  assert space.decode(numbers) == space.decode(numbers.tolist())


def test_encode_rejects_choices_outside_the_space():
  space = _space('tiny')
  good = space.choices([0] * 8)
  for stage, change in ((0, {'kernel': 7}), (1, {'expand': 2}),
                        (0, {'layers': 3}), (1, {'block': 'conv'})):
    bad = [dict(c) for c in good]
    bad[stage].update(change)
    with pytest.raises(ValueError, match='not in the space'):
      space.encode(bad)
  with pytest.raises(ValueError):
    space.encode(good[:1])
  with pytest.raises(ValueError):
    space.encode([{'block': 'mbconv'}, good[1]])


def test_to_dict_is_json_and_identifies_the_space():
  tiny = _space('tiny').to_dict()
  assert json.loads(json.dumps(tiny)) == tiny
  assert tiny == _space('tiny').to_dict()
  assert tiny != _space('digits').to_dict()
  assert tiny['decisions'][1] == {'name': 'stage0.layers', 'options': [1, 2]}
  assert arch_lib.Architecture.from_dict(tiny['backbone']) == \
      space_lib.backbone('tiny')


def test_random_numbers_follow_the_generator():
  space = _space('s')
  a = space.random_numbers(np.random.default_rng(7))
  assert a == space.random_numbers(np.random.default_rng(7))
  assert a != space.random_numbers(np.random.default_rng(8))


def test_backbone_names():
  assert space_lib.backbone('tiny').name == 'tiny'
  assert space_lib.backbone('digits').name == 's_digits'
  assert space_lib.backbone('S') == arch_lib.get_architecture('s')
  with pytest.raises(ValueError, match='unknown NAS backbone'):
    space_lib.backbone('resnet50')
