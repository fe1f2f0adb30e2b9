"""From `config.distill` to the loss terms and extra networks of a run.

    config.distill.mode = 'stacked'      # or 'label_heads' (the ablation), 'off'
    config.distill.taps = ('auto',)      # model feature names; auto: the last
                                         # stage (EfficientNetV2) / 'encoded'
    config.distill.extractor = 'auto'    # a catalogue name, or chosen from
                                         # the budgets (distill.budget.*)

The trainer calls `terms_and_extras` once, with the run's model and mesh;
everything else (the step, sharding, EMA, checkpoints, resume) is the
trainer's own, because the second extractors are `task.ExtraNetwork`s: they
live in `TrainState.extras`, and the exported model never includes them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from effnetv2_jax.distill import term as term_lib

log = logging.getLogger(__name__)

MODES = ('off', 'stacked', 'label_heads')
SECOND_MODES = ('joint', 'frozen')
_DEFAULT_KIND = {'efficientnetv2': 'mbconv', 'vit': 'transformer',
                 'mixer': 'mixer'}


@dataclasses.dataclass(frozen=True)
class ExtractorNetwork:
  """What `task.ExtraNetwork` builds: one second extractor with its head."""

  spec: Any  # extractors.ExtractorSpec
  num_classes: int
  dtype: Any = jnp.float32

  def build(self, seed):
    from effnetv2_jax.distill import extractors  # pylint: disable=g-import-not-at-top
    from effnetv2_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
    return extractors.build_extractor(self.spec, self.num_classes,
                                      rngs=state_lib.param_rngs(seed),
                                      dtype=self.dtype)


def feature_shapes(model_spec, image_size: int) -> dict[str, tuple]:
  """Each feature's shape for one image of `image_size` (no compute)."""
  model = model_spec.build(0)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  _, features = jax.eval_shape(
      lambda x: model(x, training=False, return_features=True), images)
  return {name: tuple(f.shape) for name, f in features.items()}


def resolve_taps(taps: Sequence[str], shapes: dict[str, tuple]
                 ) -> tuple[str, ...]:
  """'auto' -> the last feature map before the head ('encoded' for token
  models, the last stage for EfficientNetV2); names are checked."""
  if tuple(taps) == ('auto',):
    if 'encoded' in shapes:
      return ('encoded',)
    stages = sorted((k for k in shapes if k.startswith('stage')),
                    key=lambda k: int(k[5:]))
    return (stages[-1],)
  unknown = [t for t in taps if t not in shapes or t == 'pre_logits']
  if unknown:
    choices = ', '.join(k for k in shapes if k != 'pre_logits')
    raise ValueError(f'config.distill.taps: no feature {unknown[0]!r}; '
                     f'choose from {choices}')
  return tuple(taps)


def candidates_for(family: str, shape: tuple, kind: str = 'auto'):
  """The store's second extractors that fit a tap of `shape`."""
  from effnetv2_jax.distill import extractors  # pylint: disable=g-import-not-at-top
  kind = _DEFAULT_KIND.get(family, 'mbconv') if kind == 'auto' else kind
  tokens = shape[1] if len(shape) == 3 else None
  return extractors.catalogue(shape[-1], kind, tokens=tokens)


def terms_and_extras(config, model_spec, *, image_size: int,
                     choose=None) -> tuple[list, list, str]:
  """(loss terms, extra networks, a report of what was chosen and why).

  Args:
    config: the experiment config (its `distill` and `train` blocks).
    model_spec: the run's `state.ModelSpec`.
    image_size: the final stage's size (the shapes the taps report).
    choose: (candidates, tap shape) -> `extractors.Choice`, for
      `distill.extractor='auto'` (the trainer measures the candidates).
  """
  from effnetv2_jax.distill import extractors  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.training import task as task_lib  # pylint: disable=g-import-not-at-top
  d = config.distill
  if d.mode == 'off':
    return [], [], ''
  shapes = feature_shapes(model_spec, image_size)
  taps = resolve_taps(d.taps, shapes)
  task_loss = task_lib.ClassificationLoss(
      kind=config.train.loss, label_smoothing=config.train.label_smoothing)
  dtype = model_spec.options.get('dtype', jnp.float32)
  extras, lines = [], []
  for index, feature in enumerate(taps):
    name = f'distill{index}'
    if d.mode == 'label_heads':
      spec = term_lib.LabelHeadSpec(shapes[feature][-1],
                                    model_spec.num_classes)
      extras.append(task_lib.ExtraNetwork(name, spec))
      lines.append(f'tap {feature} {shapes[feature]}: label head')
      continue
    candidates = candidates_for(model_spec.family.name, shapes[feature],
                                d.kind)
    if d.extractor == 'auto':
      if choose is None:
        raise ValueError("config.distill.extractor='auto' needs measured "
                         'candidates (the trainer measures them)')
      choice = choose(candidates, shapes[feature])
      spec = choice.spec
      lines.append(f'tap {feature} {shapes[feature]}:\n{choice.table}\n'
                   f'{choice.reason}')
    else:
      spec = extractors.select(d.extractor, candidates)
      lines.append(f'tap {feature} {shapes[feature]}: {spec.name} (by name)')
    make_optimizer = (None if d.second == 'joint'
                      else lambda lr: optax.set_to_zero())
    extras.append(task_lib.ExtraNetwork(
        name, ExtractorNetwork(spec, model_spec.num_classes, dtype),
        make_optimizer=make_optimizer))
  tap_list = tuple(term_lib.Tap(f, e.name) for f, e in zip(taps, extras))
  if d.mode == 'label_heads':
    term = term_lib.LabelHeads(tap_list, task_loss, head_weight=d.head_weight)
  else:
    term = term_lib.StackedDistillation(
        tap_list, task_loss, weight=d.weight, head_weight=d.head_weight,
        distance=d.distance)
  return [term], extras, '\n'.join(lines)


def cost_measurer(config, *, mesh, model_spec, num_train_examples: int,
                  total_epochs: float, batch_size: int, image_size: int):
  """(spec, tap name) -> dict(memory_bytes, macs): a candidate's extra
  training memory (the compiled gradient program's estimate with the
  candidate on that tap against without any) and its MACs per image."""
  from effnetv2_jax.distill import extractors  # pylint: disable=g-import-not-at-top
  from effnetv2_jax.training import compilation, task as task_lib  # pylint: disable=g-import-not-at-top
  task_loss = task_lib.ClassificationLoss(
      kind=config.train.loss, label_smoothing=config.train.label_smoothing)
  dtype = model_spec.options.get('dtype', jnp.float32)
  shapes = feature_shapes(model_spec, image_size)

  def program_bytes(terms, extras) -> int:
    task = task_lib.task_from_config(
        config, mesh=mesh, model=model_spec,
        num_train_examples=num_train_examples, total_epochs=total_epochs,
        terms=terms, extras=extras)
    compiled = task.lower('gradient', batch_size, image_size).compile()
    return sum(compilation.memory_estimate(compiled).values())

  base = []  # measured once, on first use

  def measure(spec, tap: str) -> dict:
    if not base:
      base.append(program_bytes((), ()))
    extra = task_lib.ExtraNetwork(
        'distill0', ExtractorNetwork(spec, model_spec.num_classes, dtype))
    term = term_lib.StackedDistillation(
        (term_lib.Tap(tap, 'distill0'),), task_loss)
    return dict(memory_bytes=program_bytes([term], [extra]) - base[0],
                macs=extractors.extractor_macs(spec, shapes[tap][1:]))

  return measure


def measured_chooser(config, **context):
  """`choose` for terms_and_extras: each candidate's costs (`cost_measurer`,
  same arguments), then `extractors.determine` under config.distill.budget.
  """
  from effnetv2_jax.distill import extractors  # pylint: disable=g-import-not-at-top
  measure_costs = cost_measurer(config, **context)
  shapes = feature_shapes(context['model_spec'], context['image_size'])

  def choose(candidates, shape):
    tap = next(name for name, s in shapes.items() if s == shape)
    return extractors.determine(
        candidates, measure=lambda spec: dict(measure_costs(spec, tap),
                                              accuracy=None),
        **budget_limits(config.distill.budget, with_accuracy=False))

  return choose


def budget_limits(budget, *, with_accuracy: bool) -> dict:
  """`extractors.determine`'s keyword budgets from config.distill.budget
  (0 means no budget)."""
  limits = dict(
      max_memory_bytes=(budget.max_memory_mb * 2**20
                        if budget.max_memory_mb else None),
      max_macs=budget.max_mmacs * 1e6 if budget.max_mmacs else None)
  if with_accuracy:
    limits['min_accuracy'] = budget.min_accuracy or None
  return limits


def candidate_costs(config, **context) -> list[dict]:
  """Every store candidate for the run's one tap with its costs
  (`cost_measurer`): what `python -m effnetv2_jax.distill` trials."""
  model_spec = context['model_spec']
  shapes = feature_shapes(model_spec, context['image_size'])
  taps = resolve_taps(config.distill.taps, shapes)
  if len(taps) != 1:
    raise ValueError(
        f'config.distill.taps: accuracy trials choose one extractor for one '
        f'tap; got {len(taps)} ({", ".join(taps)})')
  measure = cost_measurer(config, **context)
  rows = []
  for spec in candidates_for(model_spec.family.name, shapes[taps[0]],
                             config.distill.kind):
    rows.append(dict(name=spec.name, tap=taps[0],
                     shape=list(shapes[taps[0]]), **measure(spec, taps[0])))
  return rows
