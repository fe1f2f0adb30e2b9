"""EfficientNet-V1 B0-B7 (Tan & Le 2019) as rows of the architecture table."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest
from flax import nnx

from effnetv2_jax.models import arch
from effnetv2_jax.models import efficientnetv2 as effnet
from effnetv2_jax.training.state import ModelSpec

# The fields every stored model dict had before `round_down_guard` existed.
STORED_FIELDS = {'name', 'stages', 'width_multiplier', 'depth_multiplier',
                 'head_channels', 'depth_divisor', 'min_depth', 'dropout_rate',
                 'train_size', 'eval_size', 'normalization'}


@pytest.mark.parametrize('variant', arch.V1_VARIANTS)
def test_v1_parameter_count_matches_the_published_one(variant):
  # Counted abstractly (no weights allocated) by what the trainer reports.
  assert ModelSpec(variant, 1000).num_params() == arch.OFFICIAL_PARAMS[variant]


def test_round_down_guard_adds_a_divisor_where_rounding_loses_over_10pct():
  plain = arch.get_architecture('b0').replace(width_multiplier=0.55)
  guarded = plain.replace(round_down_guard=True)
  # 20 * 0.55 = 11 rounds to 8, 27% below 11: V1 takes 16, V2 keeps 8.
  assert plain.round_filters(20) == 8
  assert guarded.round_filters(20) == 16
  # 32 * 0.55 = 17.6 rounds to 16, 9% below: both keep it.
  assert plain.round_filters(32) == guarded.round_filters(32) == 16


def test_b3_widths_follow_the_v1_rounding():
  b3 = arch.get_architecture('efficientnet-b3')
  assert b3.round_down_guard
  # timm's efficientnet_b3 / keras EfficientNetB3 widths: 16 * 1.2 = 19.2
  # rounds to 16, over 10% down, so the guard makes stage 2 output 24.
  assert b3.stem_channels == 40
  assert [s[-1].out_channels for s in b3.stage_blocks()] == [
      24, 32, 48, 96, 136, 232, 384]
  assert b3.head_width == 1536
  without = b3.replace(round_down_guard=False)
  assert without.stage_blocks()[0][-1].out_channels == 16


def test_v1_table_matches_the_official_builder():
  b0 = arch.get_architecture('efficientnet-b0')
  assert [s.to_string() for s in b0.stages] == [
      'r1_k3_s1_e1_i32_o16_se0.25', 'r2_k3_s2_e6_i16_o24_se0.25',
      'r2_k5_s2_e6_i24_o40_se0.25', 'r3_k3_s2_e6_i40_o80_se0.25',
      'r3_k5_s1_e6_i80_o112_se0.25', 'r4_k5_s2_e6_i112_o192_se0.25',
      'r1_k3_s1_e6_i192_o320_se0.25']
  official = {  # efficientnet_params: (width, depth, resolution, dropout)
      'b0': (1.0, 1.0, 224, 0.2), 'b1': (1.0, 1.1, 240, 0.2),
      'b2': (1.1, 1.2, 260, 0.3), 'b3': (1.2, 1.4, 300, 0.3),
      'b4': (1.4, 1.8, 380, 0.4), 'b5': (1.6, 2.2, 456, 0.4),
      'b6': (1.8, 2.6, 528, 0.5), 'b7': (2.0, 3.1, 600, 0.5)}
  assert arch.V1_VARIANTS == tuple(f'efficientnet-{k}' for k in official)
  for key, (width, depth, size, dropout) in official.items():
    a = arch.get_architecture(f'efficientnet-{key}')
    assert (a.width_multiplier, a.depth_multiplier, a.train_size,
            a.eval_size, a.dropout_rate) == (width, depth, size, size, dropout)
    assert a.normalization == 'imagenet' and a.head_channels == 1280
    assert not any(s.fused for s in a.stages)


def test_v1_blocks_are_mbconv_with_se_from_the_block_input():
  model = nnx.eval_shape(lambda: ModelSpec('efficientnet-b0', 1000).build(0))
  first, second = model.blocks[0], model.blocks[1]
  assert isinstance(first, effnet.MBConv) and first.expand_conv is None
  # SE reduces to int(input filters * 0.25): 32 -> 8 in the first block,
  # 16 -> 4 in the second (whose expanded width is 96).
  assert first.se.reduce.kernel.shape[-2:] == (32, 8)
  assert second.expand_conv.kernel.shape[-2:] == (16, 96)
  assert second.se.reduce.kernel.shape[-2:] == (96, 4)
  assert model.stem.conv.kernel.shape[-1] == 32


def test_a_small_v1_network_runs_forward():
  # Three stages hold every V1 block kind: e1 with SE, e6 k3 and k5 with SE.
  b0 = arch.get_architecture('efficientnet-b0')
  small = arch.scaled(b0.replace(stages=b0.stages[:3]), width=0.5,
                      depth=0.5, head_channels=32)
  model = effnet.create_model(small, 5, conv_impl='xla', rngs=0)
  logits = nnx.jit(lambda m, x: m(x, training=False))(
      model, jnp.ones((2, 32, 32, 3)))
  assert logits.shape == (2, 5)
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize('alias', [
    'efficientnet-b4', 'efficientnet_b4', 'tf_efficientnet_b4', 'v1-b4',
    'EfficientNet-B4', 'V1-B4', 'EfficientNetB4', ' TF_EFFICIENTNET_B4 '])
def test_v1_aliases(alias):
  assert arch.get_architecture(alias) == arch.get_architecture(
      'efficientnet-b4')
  assert arch.get_architecture(alias).name == 'efficientnet-b4'


def test_v2_names_keep_their_meaning():
  for name in arch.VARIANTS:
    a = arch.get_architecture(name)
    assert a.name == name and not a.round_down_guard
  assert arch.get_architecture('b0').stages[0].fused  # EfficientNetV2-B0
  assert arch.get_architecture('efficientnetv2-b0').name == 'b0'
  assert not set(arch.V1_VARIANTS) & set(arch.VARIANTS)
  with pytest.raises(ValueError, match='unknown EfficientNetV2'):
    arch.normalize_variant_name('efficientnet-b0')  # the V2 recipes' names


def test_unknown_names_list_the_choices():
  with pytest.raises(ValueError, match="'efficientnet-b8'.*efficientnet-b7"):
    arch.get_architecture('efficientnet-b8')
  with pytest.raises(ValueError, match="'q'.*b3.*efficientnet-b0"):
    arch.get_architecture('q')


def test_to_dict_leaves_the_guard_out_at_its_default():
  for name in arch.VARIANTS:
    assert set(arch.get_architecture(name).to_dict()) == STORED_FIELDS
  v1 = arch.get_architecture('efficientnet-b2').to_dict()
  assert set(v1) == STORED_FIELDS | {'round_down_guard'}
  assert v1['round_down_guard'] is True


def test_from_dict_reads_dicts_with_and_without_the_guard():
  v1 = arch.get_architecture('efficientnet-b3')
  assert arch.Architecture.from_dict(json.loads(json.dumps(v1.to_dict()))) == v1
  stored = {k: v for k, v in v1.to_dict().items() if k != 'round_down_guard'}
  assert arch.Architecture.from_dict(stored) == v1.replace(
      round_down_guard=False)
  v2 = arch.get_architecture('s')
  assert arch.Architecture.from_dict(dict(v2.to_dict(), round_down_guard=False)
                                     ) == v2
