"""Second extractors: shapes, training, MAC counts, the choice under budgets."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jax_core
import pytest
from flax import nnx

from effnetv2_jax.distill import extractors as ex

NUM_CLASSES = 10


def _abstract_forward(spec, f1_shape, *, training):
  """(f2, logits) shapes of one call, traced without running anything."""
  model = nnx.eval_shape(lambda: ex.build_extractor(spec, NUM_CLASSES,
                                                    rngs=0))
  graphdef, state = nnx.split(model)

  def forward(state, f1):
    return nnx.merge(graphdef, state)(f1, training=training)

  return jax.eval_shape(forward, state,
                        jax.ShapeDtypeStruct(f1_shape, jnp.float32))


def _conv_catalogue_cases():
  return [pytest.param(spec, size, id=f'{spec.name}-w{width}-{size}px')
          for width, size in ((8, 5), (24, 8))
          for kind in ex.CONV_KINDS
          for spec in ex.catalogue(width, kind)]


def _token_catalogue_cases():
  return [pytest.param(spec, tokens, id=f'{spec.name}-w{width}-n{tokens}')
          for width, tokens in ((32, 9), (64, 16))
          for kind in ex.TOKEN_KINDS
          for spec in ex.catalogue(width, kind, tokens=tokens)]


@pytest.mark.parametrize('spec,size', _conv_catalogue_cases())
@pytest.mark.parametrize('training', [True, False])
def test_every_conv_extractor_keeps_the_shape(spec, size, training):
  f1_shape = (2, size, size, spec.width)
  f2, logits = _abstract_forward(spec, f1_shape, training=training)
  assert f2.shape == f1_shape
  assert logits.shape == (2, NUM_CLASSES)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize('spec,tokens', _token_catalogue_cases())
@pytest.mark.parametrize('training', [True, False])
def test_every_token_extractor_keeps_the_shape(spec, tokens, training):
  f1_shape = (2, tokens, spec.width)
  f2, logits = _abstract_forward(spec, f1_shape, training=training)
  assert f2.shape == f1_shape
  assert logits.shape == (2, NUM_CLASSES)
  assert logits.dtype == jnp.float32


def test_catalogue_names_and_sizes():
  fused = ex.catalogue(16, 'fused_mbconv')
  assert [s.name for s in fused] == [
      'fused_mbconv-d1-e1', 'fused_mbconv-d1-e4', 'fused_mbconv-d2-e1',
      'fused_mbconv-d2-e4', 'fused_mbconv-d4-e1', 'fused_mbconv-d4-e4']
  mbconv = ex.catalogue(16, 'mbconv')
  assert {(s.depth, s.expansion) for s in mbconv} == {
      (d, e) for d in (1, 2, 4) for e in (4, 6)}
  assert all(s.kernel == 3 and s.width == 16 for s in fused + mbconv)
  mixer = ex.catalogue(64, 'mixer', tokens=49)
  assert {s.name for s in mixer} == {
      f'mixer-d{d}-r{r}' for d in (1, 2, 4) for r in (2, 4)}
  assert all(s.tokens == 49 for s in mixer)
  # The token count a tap reports means nothing to a transformer.
  assert all(s.tokens is None and s.heads == 1
             for s in ex.catalogue(64, 'transformer', tokens=49))


def test_blocks_follow_efficientnetv2():
  mbconv = ex.ExtractorSpec(kind='mbconv', width=40, depth=2, expansion=6)
  block = mbconv.block_spec()
  # SE reduced from the block's input width, as EfficientNetV2's stages.
  assert (block.se_channels, block.mid_channels) == (10, 240)
  assert block.has_residual and block.stride == 1
  fused = ex.ExtractorSpec(kind='fused_mbconv', width=40, depth=2,
                           expansion=4).block_spec()
  assert fused.fused and fused.se_channels is None


def test_default_heads_are_64_wide():
  # ViT-Ti/S/B: 192/3, 384/6, 768/12.
  assert [ex.default_heads(w) for w in (192, 384, 768)] == [3, 6, 12]
  assert ex.default_heads(32) == 1
  assert ex.default_heads(160) == 2  # 80 wide: 160 is not a multiple of 64


def test_spec_round_trips_and_rejects_bad_fields():
  spec = ex.ExtractorSpec(kind='mixer', width=32, depth=2, expansion=4,
                          tokens=16)
  assert ex.ExtractorSpec.from_dict(spec.to_dict()) == spec
  assert spec.name == 'mixer-d2-r4'
  assert ex.ExtractorSpec(kind='mbconv', width=8, depth=1, expansion=4,
                          kernel=5).name == 'mbconv-d1-e4-k5'
  with pytest.raises(ValueError, match="kind must be one of.*'conv'"):
    ex.ExtractorSpec(kind='conv', width=8, depth=1, expansion=4)
  with pytest.raises(ValueError, match='depth must be a positive int'):
    ex.ExtractorSpec(kind='mbconv', width=8, depth=0, expansion=4)
  with pytest.raises(ValueError, match='tokens'):
    ex.ExtractorSpec(kind='mixer', width=8, depth=1, expansion=4)
  with pytest.raises(ValueError, match='heads=3 does not divide width 8'):
    ex.ExtractorSpec(kind='transformer', width=8, depth=1, expansion=4,
                     heads=3)
  with pytest.raises(ValueError, match='heads=2 has no meaning'):
    ex.ExtractorSpec(kind='mbconv', width=8, depth=1, expansion=4, heads=2)
  with pytest.raises(ValueError, match="unknown ExtractorSpec field 'ratio'"):
    ex.ExtractorSpec.from_dict({'kind': 'mbconv', 'width': 8, 'depth': 1,
                                'expansion': 4, 'ratio': 2})
  with pytest.raises(ValueError, match='needs tokens='):
    ex.catalogue(8, 'mixer')
  with pytest.raises(ValueError, match="got 'resnet'"):
    ex.catalogue(8, 'resnet')


def test_conv_extractor_runs_and_rejects_a_wrong_feature():
  spec = ex.ExtractorSpec(kind='mbconv', width=8, depth=2, expansion=4)
  model = ex.build_extractor(spec, NUM_CLASSES, rngs=0)
  f1 = jax.random.normal(jax.random.key(0), (4, 5, 5, 8))
  f2, logits = model(f1, training=False)
  assert f2.shape == f1.shape
  assert bool(jnp.all(jnp.isfinite(f2))) and bool(jnp.all(jnp.isfinite(
      logits)))
  assert float(jnp.max(jnp.abs(f2 - f1))) > 1e-3
  # bn_groups reaches the BatchNorms: 3 groups cannot split 4 examples.
  model(f1, training=True, bn_groups=2)
  with pytest.raises(ValueError, match='groups=3'):
    model(f1, training=True, bn_groups=3)
  with pytest.raises(ValueError, match='has width 8, the feature'):
    model(jnp.zeros((4, 5, 5, 16)), training=False)
  with pytest.raises(ValueError, match=r'takes a \[B, H, W, C\] batch'):
    model(jnp.zeros((5, 5, 8)), training=False)


def test_token_extractor_runs_and_rejects_a_wrong_feature():
  spec = ex.ExtractorSpec(kind='mixer', width=16, depth=2, expansion=2,
                          tokens=9)
  model = ex.build_extractor(spec, NUM_CLASSES, rngs=0)
  f1 = jax.random.normal(jax.random.key(0), (4, 9, 16))
  f2, logits = model(f1, training=True, rng=jax.random.key(1))
  assert f2.shape == f1.shape and logits.shape == (4, NUM_CLASSES)
  assert float(jnp.max(jnp.abs(f2 - f1))) > 1e-3
  # Progressive learning's smaller images: the 3x3 grid the mixer is built
  # for and a 4x4 one resample into each other; 10 tokens are no grid.
  f2, _ = model(jnp.ones((4, 16, 16)), training=False)
  assert f2.shape == (4, 16, 16)
  with pytest.raises(ValueError, match='mixes 9 tokens'):
    model(jnp.zeros((4, 10, 16)), training=False)
  with pytest.raises(ValueError, match=r'takes a \[B, N, D\] batch'):
    model(jnp.zeros((4, 3, 3, 16)), training=False)
  with pytest.raises(ValueError, match='has width 16, the feature'):
    model(jnp.zeros((4, 9, 8)), training=False)


@pytest.mark.parametrize('kind,f1_shape', [
    ('fused_mbconv', (8, 4, 4, 8)), ('mbconv', (8, 4, 4, 8)),
    ('transformer', (8, 9, 8)), ('mixer', (8, 9, 8))])
def test_extractor_trains(kind, f1_shape):
  spec = ex.ExtractorSpec(kind=kind, width=8, depth=2, expansion=4,
                          tokens=f1_shape[1] if kind == 'mixer' else None)
  model = ex.build_extractor(spec, NUM_CLASSES, rngs=1)
  params = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) > 8 * NUM_CLASSES
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  f1 = jax.random.normal(jax.random.key(2), f1_shape)
  labels = jnp.arange(8) % NUM_CLASSES

  def loss_fn(model):
    _, logits = model(f1, training=True, rng=jax.random.key(3))
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads

  loss0, grads = step(model, optimizer)
  # The blocks learn from the head's loss, not the classifier alone.
  block_grads = jax.tree.leaves(grads['blocks'])
  assert block_grads and all(float(jnp.abs(g).max()) > 0
                             for g in block_grads)
  losses = [float(loss0)] + [float(step(model, optimizer)[0])
                             for _ in range(4)]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_conv_macs_by_hand():
  fused = ex.ExtractorSpec(kind='fused_mbconv', width=8, depth=1,
                           expansion=1)
  # One 3x3 conv 8 -> 8 on 4 x 4 (padding taps counted), then the head.
  assert ex.extractor_macs(fused, (4, 4, 8), num_classes=10) == (
      4 * 4 * 9 * 8 * 8 + 8 * 10)
  # Inside the map only: 2 + 3 + 3 + 2 taps per side.
  assert ex.extractor_macs(fused, (4, 4, 8), padding_taps=False) == (
      10 * 10 * 8 * 8)
  mbconv = ex.ExtractorSpec(kind='mbconv', width=8, depth=2, expansion=4)
  block = (4 * 4 * 8 * 32          # 1x1 expand 8 -> 32
           + 4 * 4 * 9 * 32        # depthwise 3x3
           + 2 * 32 * 2 + 4 * 4 * 32  # SE 32 -> int(8 * 0.25) -> 32, gate
           + 4 * 4 * 32 * 8)       # 1x1 project
  # A leading batch axis is allowed and ignored.
  assert ex.extractor_macs(mbconv, (3, 4, 4, 8)) == 2 * block
  with pytest.raises(ValueError, match='square'):
    ex.extractor_macs(mbconv, (4, 6, 8))
  with pytest.raises(ValueError, match='has width 8'):
    ex.extractor_macs(mbconv, (4, 4, 16))


def _xla_macs(model, f1_shape):
  """XLA's cost analysis of the compiled eval forward on CPU, flops / 2."""
  graphdef, state = nnx.split(model)

  def forward(state, f1):
    return nnx.merge(graphdef, state)(f1, training=False)

  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  f1 = jax.ShapeDtypeStruct(f1_shape, jnp.float32, sharding=cpu)
  cost = jax.jit(forward).lower(state, f1).compile().cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per device
    cost = cost[0]
  return cost['flops'] / 2


@pytest.mark.parametrize('kind', ex.CONV_KINDS)
def test_conv_macs_against_xla(kind):
  shape = (8, 8, 64)
  for spec in ex.catalogue(64, kind):
    model = ex.build_extractor(spec, NUM_CLASSES, rngs=0, conv_impl='xla')
    ours = ex.extractor_macs(spec, shape, num_classes=NUM_CLASSES,
                             padding_taps=False)
    xla = _xla_macs(model, (1,) + shape)
    # XLA also counts the element-wise work (BN, SiLU, the SE gate, adds),
    # a few percent at 64 channels; it never counts less than the
    # multiply-accumulates.
    assert 0 < (xla - ours) / ours < 0.08, spec.name


def _dot_macs(jaxpr) -> int:
  """Multiply-accumulates of every dot_general in a jaxpr, nested ones too:
  each lhs element meets each of the rhs's free (not contracted, not
  batch) positions once."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (_, rhs_contract), (_, rhs_batch) = eqn.params['dimension_numbers']
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      total += math.prod(lhs) * math.prod(
          n for i, n in enumerate(rhs)
          if i not in rhs_contract and i not in rhs_batch)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          total += _dot_macs(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          total += _dot_macs(sub)
  return total


@pytest.mark.parametrize('kind', ex.TOKEN_KINDS)
def test_token_macs_are_the_programs_matmuls(kind):
  tokens, width = 16, 64
  for spec in ex.catalogue(width, kind, tokens=tokens):
    model = ex.build_extractor(spec, NUM_CLASSES, rngs=0)
    graphdef, state = nnx.split(model)

    def forward(state, f1):
      return nnx.merge(graphdef, state)(f1, training=False)

    jaxpr = jax.make_jaxpr(forward)(state, jnp.zeros((1, tokens, width)))
    assert _dot_macs(jaxpr.jaxpr) == ex.extractor_macs(
        spec, (tokens, width), num_classes=NUM_CLASSES), spec.name


def test_token_macs_by_hand():
  vit = ex.ExtractorSpec(kind='transformer', width=8, depth=3, expansion=2)
  n, d = 5, 8
  block = 3 * n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * (2 * d)
  assert ex.extractor_macs(vit, (2, n, d), num_classes=4) == 3 * block + d * 4
  mixer = ex.ExtractorSpec(kind='mixer', width=8, depth=1, expansion=4,
                           tokens=n)
  # Token MLP n -> d/2 -> n per channel, channel MLP d -> 4d -> d per token.
  assert ex.extractor_macs(mixer, (n, d)) == (2 * d * n * 4
                                              + 2 * n * d * 32)
  # Resampled to the 5 tokens it mixes; the channel MLP runs on all 6.
  assert ex.extractor_macs(mixer, (6, d)) == (2 * d * n * 4
                                              + 2 * 6 * d * 32)
  with pytest.raises(ValueError, match=r'takes a \(N, D\) feature'):
    ex.extractor_macs(mixer, (1, 2, 2, d))


# ---------------------------------------------------------------------------
# determine and select


def _specs():
  return ex.catalogue(16, 'fused_mbconv')  # d1-e1, d1-e4, d2-e1, ... d4-e4


# name -> (memory_bytes, macs, accuracy): MACs grow down the catalogue except
# that d2-e1 ties d1-e4 on MACs with less memory.
_MEASURED = {
    'fused_mbconv-d1-e1': (100, 10, 0.50),
    'fused_mbconv-d1-e4': (300, 40, 0.60),
    'fused_mbconv-d2-e1': (200, 40, 0.55),
    'fused_mbconv-d2-e4': (600, 80, 0.70),
    'fused_mbconv-d4-e1': (400, 60, 0.58),
    'fused_mbconv-d4-e4': (1200, 160, 0.65),
}


def _measure(spec):
  memory, macs, accuracy = _MEASURED[spec.name]
  return dict(memory_bytes=memory, macs=macs, accuracy=accuracy)


def _chosen_lines(table):
  return [line for line in table.splitlines() if line.startswith('*')]


def test_determine_without_budgets_takes_the_most_macs():
  choice = ex.determine(_specs(), measure=_measure)
  assert choice.spec.name == 'fused_mbconv-d4-e4'
  assert 'no budget given' in choice.reason
  assert [r['name'] for r in choice.rows] == [s.name for s in _specs()]


def test_determine_under_a_memory_budget_marks_its_row():
  choice = ex.determine(_specs(), measure=_measure, max_memory_bytes=500)
  assert choice.spec.name == 'fused_mbconv-d4-e1'
  lines = choice.table.splitlines()
  assert 'memory<=' in lines[0]
  assert len(lines) == 1 + len(_specs())
  chosen = _chosen_lines(choice.table)
  assert len(chosen) == 1 and 'fused_mbconv-d4-e1' in chosen[0]
  over = next(line for line in lines if 'fused_mbconv-d2-e4' in line)
  assert over.rstrip().endswith('no')
  assert [r['chosen'] for r in choice.rows].count(True) == 1
  assert choice.rows[3]['fits'] == {'max_memory_bytes': False}


def test_determine_under_a_mac_budget_breaks_ties_by_memory():
  choice = ex.determine(_specs(), measure=_measure, max_macs=50)
  # d1-e4 and d2-e1 both have 40 MACs; d2-e1 needs less memory.
  assert choice.spec.name == 'fused_mbconv-d2-e1'
  assert 'fused_mbconv-d1-e4' in choice.reason
  assert 'max_macs=50' in choice.reason


def test_determine_with_an_accuracy_floor_and_a_memory_budget():
  choice = ex.determine(_specs(), measure=_measure, min_accuracy=0.6,
                        max_memory_bytes=1000)
  # d2-e4 (0.70) and d1-e4 (0.60) clear the floor within memory.
  assert choice.spec.name == 'fused_mbconv-d2-e4'
  assert '2 of 6 candidates' in choice.reason


def test_determine_names_the_tightest_budget_when_nothing_fits():
  with pytest.raises(ValueError,
                     match=r'tightest, max_memory_bytes=50, admits 0 of 6 '
                     r"candidates \(closest: 'fused_mbconv-d1-e1' with "
                     r'memory_bytes=100\)'):
    ex.determine(_specs(), measure=_measure, max_memory_bytes=50)
  # Memory admits d1-e1 and d2-e1, the floor three others: none both.
  with pytest.raises(ValueError,
                     match=r'tightest, max_memory_bytes=250, admits 2 of 6 '
                     r'candidates; min_accuracy=0.6 admits 3$'):
    ex.determine(_specs(), measure=_measure, max_memory_bytes=250,
                 min_accuracy=0.6)


def test_determine_an_unmeasured_accuracy_is_outside_the_floor():
  # Candidates a ceiling already excludes are not trialled (accuracy None).
  def measure(spec):
    row = _measure(spec)
    return dict(row, accuracy=None if row['memory_bytes'] > 300 else
                row['accuracy'])
  choice = ex.determine(_specs(), measure=measure, min_accuracy=0.56,
                        max_memory_bytes=300)
  assert choice.spec.name == 'fused_mbconv-d1-e4'  # 40 MACs, 0.60
  assert choice.rows[3]['fits'] == {'max_memory_bytes': False,
                                    'min_accuracy': False}
  unmeasured = next(line for line in choice.table.splitlines()
                    if 'fused_mbconv-d4-e4' in line)
  assert ' - ' in unmeasured
  with pytest.raises(ValueError, match=r'min_accuracy=0.5, admits 0 of 6 '
                     r'candidates; max_memory_bytes=300 admits 3$'):
    ex.determine(_specs(), min_accuracy=0.5, max_memory_bytes=300,
                 measure=lambda s: dict(_measure(s), accuracy=None))


def test_determine_rejects_bad_measurements_and_inputs():
  with pytest.raises(ValueError, match='at least one candidate'):
    ex.determine([], measure=_measure)
  with pytest.raises(ValueError, match=r"\['macs'\] must be a non-negative"):
    ex.determine(_specs(), measure=lambda s: dict(memory_bytes=1))
  with pytest.raises(ValueError, match="'fused_mbconv-d1-e1' repeats"):
    ex.determine(_specs()[:1] * 2, measure=_measure)
  with pytest.raises(ValueError, match='max_macs must be'):
    ex.determine(_specs(), measure=_measure, max_macs=-1)


def test_select_by_name():
  specs = _specs()
  assert ex.select('fused_mbconv-d2-e4', specs) is specs[3]
  with pytest.raises(ValueError, match="no second extractor 'mbconv-d9'; "
                     'choose from fused_mbconv-d1-e1, fused_mbconv-d1-e4'):
    ex.select('mbconv-d9', specs)
