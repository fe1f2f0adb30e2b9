"""`TrainTask`: the one owner of what a train step is.

A task holds the network's graph, the objective, the optimizer, the learning
rate schedule, the weight average and the mesh, and from them gives every
signature the rest of the trainer needs: the state layout and its
shardings, the initial state, the gradient / update / eval functions, the
per-step hyper-parameters and the batch shapes. The compiler, the loop,
checkpoints and the benchmarks take these from the task; nothing else
spells a step's arguments.

A train step runs as two programs. The gradient step (forward and backward;
one program per batch and image size) returns gradients and this batch's
BatchNorm statistics; the update step (optimizer, EMA and step counter; one
program for the whole run) applies them. Everything that changes during
training is an argument, including the stage's dropout rate and
learning-rate numbers (`hparams`, traced scalars), so an executable depends
on shapes alone and a planner that changes only regularisation reuses it.

Two seams for new training methods:
  * loss terms (`LossTerm`): added to the classification loss; a term may ask
    the model for its intermediate features and may run extra networks;
  * extra networks (`ExtraNetwork`): trained beside the model with their own
    optimizer slots and weight average, held in `TrainState.extras` and so
    checkpointed and resumed like the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effnetv2_jax.training import ema as ema_lib
from effnetv2_jax.training import mesh as mesh_lib
from effnetv2_jax.training import optimizer as optimizer_lib
from effnetv2_jax.training import schedules
from effnetv2_jax.training import state as state_lib
from effnetv2_jax.training import steps as steps_lib

# The traced scalars every step takes: the schedule's per-stage numbers and
# the stage's dropout rate.
HPARAM_NAMES = schedules.STAGE_HPARAM_NAMES + ('dropout_rate',)


LOSS_KINDS = ('softmax', 'sigmoid', 'sigmoid_sum')


@dataclasses.dataclass(frozen=True)
class ClassificationLoss:
  """The per-example loss against (soft, possibly mixed) labels.

  kinds (the step averages the per-example values over the batch):
    'softmax'      cross entropy, as the official `softmax_cross_entropy`.
    'sigmoid'      multi-label binary cross entropy averaged over classes,
                   so the batch loss is the official
                   `tf.losses.sigmoid_cross_entropy` (mean over batch and
                   classes), on the scale its L2 weight was tuned against.
    'sigmoid_sum'  the same summed over classes: the official 'custom' loss,
                   num_classes times 'sigmoid'.
  """

  kind: str = 'softmax'
  label_smoothing: float = 0.1
  normalize_labels: bool = False  # multi-hot labels sum to 1 first

  def __post_init__(self):
    if self.kind not in LOSS_KINDS:
      raise ValueError(f'loss kind must be one of {LOSS_KINDS}, got '
                       f'{self.kind!r}')

  def __call__(self, logits, labels):
    if self.kind in ('sigmoid', 'sigmoid_sum'):
      summed = steps_lib.sigmoid_cross_entropy(
          logits, labels, label_smoothing=self.label_smoothing)
      if self.kind == 'sigmoid':
        return summed / logits.shape[-1]
      return summed
    return steps_lib.cross_entropy(
        logits, labels, label_smoothing=self.label_smoothing,
        normalize_labels=self.normalize_labels)


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What a loss term sees inside the gradient step."""

  logits: jax.Array
  features: Mapping[str, jax.Array] | None  # when a term asked for them
  batch: Mapping[str, jax.Array]
  rng: jax.Array  # a key of the term's own, fresh each step
  extras: Mapping[str, nnx.Module]  # extra networks, in training mode
  hparams: Mapping[str, jax.Array]


class LossTerm(Protocol):
  """A scalar added to the loss; logged as `loss_<name>`."""

  name: str
  needs_features: bool

  def __call__(self, inputs: LossInputs) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class ExtraNetwork:
  """A network trained beside the model, e.g. a self-distillation target.

  Attributes:
    name: its key in `TrainState.extras` and in checkpoints.
    spec: anything with `build(seed) -> nnx.Module` (a `state.ModelSpec`, or
      a small class of the caller's). Its variables must be `nnx.Param` and
      `nnx.BatchStat`.
    make_optimizer: learning rate -> optax transformation; None uses the
      model's.
  """

  name: str
  spec: Any
  make_optimizer: Callable[[Any], optax.GradientTransformation] | None = None


def bn_group_count(replicas_per_group: int, data_axis_size: int) -> int:
  """Number of BN groups of the global batch (the model's `bn_groups`).

  0: one group, moments over the global batch. N > 0: groups of N
  data-parallel replicas (N = 1 is per-device BN). -1: the official TPU
  BatchNorm, groups of min(8, replicas).
  """
  if replicas_per_group == 0:
    return 1
  if replicas_per_group < 0:
    replicas_per_group = min(8, data_axis_size)
  return data_axis_size // replicas_per_group


class TrainTask:
  """The state layout, the init, the step functions and their shardings.

  Args:
    model: the network (`state.ModelSpec`).
    mesh: the device mesh; batches are split over its 'data' axis.
    make_optimizer: learning rate -> optax transformation whose state layout
      does not depend on the rate; called inside the trace with the step's
      rate, which is how TF1 RMSProp sees the schedule.
    schedule: the config's `schedule` block (see `schedules`).
    total_epochs: the schedule's period (the planner's run length).
    num_train_examples: converts steps to epochs for the schedule.
    loss: the classification loss.
    terms: further loss terms.
    extras: networks trained beside the model.
    seed: parameter init and the dropout / stochastic depth stream.
    weight_decay: only to report the L2 term; the optimizer applies it.
    ema_decay, ema_ramp: the weight average; 0 keeps none.
    drop_path_rate: stochastic depth of the last block.
    bn_groups: >1 computes BN moments over that many equal batch groups.
    fsdp_min_size: state arrays with at least this many elements are
      sharded over the data axis (0: all replicated).
  """

  def __init__(self, model: state_lib.ModelSpec, *, mesh, make_optimizer,
               schedule: Mapping[str, Any], total_epochs: float,
               num_train_examples: int,
               loss: ClassificationLoss = ClassificationLoss(),
               terms: Sequence[LossTerm] = (),
               extras: Sequence[ExtraNetwork] = (), seed: int = 0,
               weight_decay: float = 0.0, ema_decay: float = 0.9999,
               ema_ramp: bool = True, drop_path_rate: float = 0.2,
               bn_groups: int = 1, fsdp_min_size: int = 0):
    names = [e.name for e in extras]
    if len(set(names)) != len(names):
      raise ValueError(f'extra networks need distinct names, got {names}')
    self.model = model
    self.mesh = mesh
    self.schedule = dict(schedule)
    self.num_train_examples = int(num_train_examples)
    self.loss = loss
    self.terms = tuple(terms)
    self.extras = tuple(extras)
    self.seed = seed
    self.weight_decay = weight_decay
    self.ema_decay = ema_decay
    self.ema_ramp = ema_ramp
    self.use_ema = ema_decay > 0
    self.drop_path_rate = drop_path_rate
    self.bn_groups = bn_groups
    self._make_optimizer = make_optimizer
    self._lr_fn = schedules.learning_rate_fn(schedule,
                                             total_epochs=total_epochs)
    self._jitted = {}
    self.graphdef = model.graphdef()
    self._extra_graphdefs = {e.name: state_lib.graphdef_of(e.spec)
                             for e in self.extras}
    self.batch_sharding = mesh_lib.data_sharding(mesh)
    self.replicated = mesh_lib.replicated(mesh)
    self.abstract_state = jax.eval_shape(self.init)
    self.shardings = mesh_lib.state_shardings(
        self.abstract_state, mesh, fsdp_min_size=fsdp_min_size)
    self.target = state_lib.abstract_with_shardings(self.abstract_state,
                                                    self.shardings)

  @property
  def needs_features(self) -> bool:
    return any(term.needs_features for term in self.terms)

  def _optimizer_for(self, extra: ExtraNetwork | None, learning_rate):
    make = (extra.make_optimizer if extra and extra.make_optimizer
            else self._make_optimizer)
    return make(learning_rate)

  # ---------------------------------------------------------------- state --

  def init(self) -> state_lib.TrainState:
    """The initial state (pure: jit it with `shardings`, see `init_sharded`)."""
    # The optimizer's state layout does not depend on the learning rate.
    tx = self._make_optimizer(0.0)
    params, batch_stats = state_lib.split_variables(
        self.model.build(self.seed))
    extras = {}
    for index, extra in enumerate(self.extras):
      e_params, e_stats = state_lib.split_variables(
          extra.spec.build(self.seed + 1 + index))
      extras[extra.name] = state_lib.Trainable(
          params=e_params, batch_stats=e_stats,
          opt_state=self._optimizer_for(extra, 0.0).init(e_params),
          ema_params=e_params if self.use_ema else None,
          ema_batch_stats=e_stats if self.use_ema else None)
    return state_lib.TrainState(
        step=state_lib.zero_step(), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=params if self.use_ema else None,
        ema_batch_stats=batch_stats if self.use_ema else None,
        rng=state_lib.initial_rng(self.seed), extras=extras)

  def init_sharded(self) -> state_lib.TrainState:
    return state_lib.init_sharded(self.init, self.shardings)

  def num_params(self) -> int:
    return int(sum(x.size for x in
                   jax.tree.leaves(self.abstract_state.params)))

  # ---------------------------------------------------------- the inputs --

  def hparams(self, *, batch_size: int, start_step: int, start_epoch: float,
              dropout_rate: float) -> dict[str, jax.Array]:
    """A stage's traced scalars, replicated over the mesh."""
    values = dict(
        schedules.stage_hparams(
            self.schedule, batch_size=batch_size, start_step=start_step,
            start_epoch=start_epoch,
            num_train_examples=self.num_train_examples),
        dropout_rate=dropout_rate)
    return jax.device_put({k: np.float32(values[k]) for k in HPARAM_NAMES},
                          self.replicated)

  def stage_hparams(self, settings) -> dict[str, jax.Array]:
    """`hparams` of a `progressive.StageSettings`."""
    return self.hparams(batch_size=settings.batch_size,
                        start_step=settings.start_step,
                        start_epoch=settings.start_epoch,
                        dropout_rate=settings.dropout_rate)

  def hparams_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
    return {k: scalar for k in HPARAM_NAMES}

  def batch_spec(self, batch_size: int, image_size: int, *,
                 with_mask: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch: images [B, s, s, 3], labels [B, classes] (and
    the eval pass's padding mask [B])."""
    spec = lambda *shape: jax.ShapeDtypeStruct(
        shape, jnp.float32, sharding=self.batch_sharding)
    batch = {'image': spec(batch_size, image_size, image_size, 3),
             'label': spec(batch_size, self.model.num_classes)}
    if with_mask:
      batch['mask'] = spec(batch_size)
    return batch

  # ------------------------------------------------------- the functions --

  def gradient_step(self, state, batch, hparams):
    """-> (gradients, BN statistics, metrics); both first outputs are
    (model tree, {extra name: tree})."""
    # The step number folded into the base key: a resumed run draws the
    # same dropout and stochastic-depth masks as an uninterrupted one.
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable = (state.params,
                 {name: sub.params for name, sub in state.extras.items()})
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (loss_value, (logits, batch_stats, metrics)), grads = grad_fn(
        trainable, state, batch, rng, hparams)
    labels = batch['label']
    metrics = dict(
        metrics, loss=loss_value,
        # Against mixed labels this is the share of dominant-class hits.
        train_top1=steps_lib.topk_correct(
            logits, jax.nn.one_hot(labels.argmax(-1), labels.shape[-1]),
            1).mean())
    return grads, batch_stats, metrics

  def _loss(self, trainable, state, batch, rng, hparams):
    params, extra_params = trainable
    model = nnx.merge(self.graphdef, params, state.batch_stats)
    outputs = model(batch['image'], training=True, rng=rng,
                    dropout_rate=hparams['dropout_rate'],
                    drop_path_rate=self.drop_path_rate,
                    bn_groups=self.bn_groups,
                    return_features=self.needs_features)
    logits, features = outputs if self.needs_features else (outputs, None)
    loss = self.loss(logits, batch['label']).mean()
    extras = {name: nnx.merge(self._extra_graphdefs[name], extra_params[name],
                              state.extras[name].batch_stats)
              for name in extra_params}
    metrics = {}
    for index, term in enumerate(self.terms):
      value = term(LossInputs(
          logits=logits, features=features, batch=batch,
          rng=jax.random.fold_in(rng, 1 + index), extras=extras,
          hparams=hparams))
      metrics[f'loss_{term.name}'] = value
      loss = loss + value
    batch_stats = (nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
                   {name: nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))
                    for name, net in extras.items()})
    return loss, (logits, batch_stats, metrics)

  def update_step(self, state, grads, batch_stats, hparams):
    """-> (next state, metrics): optimizer, weight average, step counter."""
    learning_rate = self._lr_fn(state.step, hparams)
    model_grads, extra_grads = grads
    model_stats, extra_stats = batch_stats
    step = state.step + 1
    decay = (ema_lib.ema_decay(step, self.ema_decay, self.ema_ramp)
             if self.use_ema else None)
    params, opt_state, ema_params, ema_stats = self._apply(
        None, learning_rate, decay, model_grads, model_stats,
        state.params, state.opt_state, state.ema_params,
        state.ema_batch_stats)
    extras = {}
    for extra in self.extras:
      sub = state.extras[extra.name]
      e_params, e_opt, e_ema, e_ema_stats = self._apply(
          extra, learning_rate, decay, extra_grads[extra.name],
          extra_stats[extra.name], sub.params, sub.opt_state, sub.ema_params,
          sub.ema_batch_stats)
      extras[extra.name] = state_lib.Trainable(
          params=e_params, batch_stats=extra_stats[extra.name],
          opt_state=e_opt, ema_params=e_ema, ema_batch_stats=e_ema_stats)
    new_state = state.replace(
        step=step, params=params, batch_stats=model_stats,
        opt_state=opt_state, ema_params=ema_params,
        ema_batch_stats=ema_stats, extras=extras)
    metrics = {'learning_rate': learning_rate,
               'grad_norm': optax.tree.norm(model_grads)}
    if self.weight_decay:
      metrics['l2_loss'] = optimizer_lib.l2_loss(state.params,
                                                 self.weight_decay)
    return new_state, metrics

  def _apply(self, extra, learning_rate, decay, grads, batch_stats, params,
             opt_state, ema_params, ema_stats):
    tx = self._optimizer_for(extra, learning_rate)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if decay is not None:
      ema_params = ema_lib.ema_update(ema_params, params, decay)
      ema_stats = ema_lib.ema_update(ema_stats, batch_stats, decay)
    return params, opt_state, ema_params, ema_stats

  def train_step(self, state, batch, hparams):
    """Both parts in one function, for callers that jit a whole step
    (tests, notebooks); the trainer compiles the two apart."""
    grads, batch_stats, metrics = self.gradient_step(state, batch, hparams)
    state, update_metrics = self.update_step(state, grads, batch_stats,
                                             hparams)
    return state, dict(metrics, **update_metrics)

  def eval_step(self, params, batch_stats, batch):
    """Masked sums over one batch for one set of the model's weights."""
    model = nnx.merge(self.graphdef, params, batch_stats)
    return steps_lib.eval_sums(model(batch['image'], training=False), batch)

  # ------------------------------------------- compiled-program contracts --

  def _split_like_step_outputs(self, tree):
    """(model part, {extra: part}) of a state-shaped tree's params or
    batch_stats, as the gradient step returns them."""
    return ((tree.params, {n: s.params for n, s in tree.extras.items()}),
            (tree.batch_stats,
             {n: s.batch_stats for n, s in tree.extras.items()}))

  def jitted(self, kind: str):
    """'gradient', 'update' or 'eval', jitted with the state's shardings
    (the update step donates the state)."""
    if kind not in self._jitted:
      self._jitted[kind] = self._jit(kind)
    return self._jitted[kind]

  def _jit(self, kind: str):
    sh, repl, batch = self.shardings, self.replicated, self.batch_sharding
    grads_sh, stats_sh = self._split_like_step_outputs(sh)
    if kind == 'gradient':
      return jax.jit(self.gradient_step, in_shardings=(sh, batch, repl),
                     out_shardings=(grads_sh, stats_sh, repl))
    if kind == 'update':
      return jax.jit(self.update_step,
                     in_shardings=(sh, grads_sh, stats_sh, repl),
                     out_shardings=(sh, repl), donate_argnums=(0,))
    if kind == 'eval':
      return jax.jit(self.eval_step,
                     in_shardings=(sh.params, sh.batch_stats, batch),
                     out_shardings=repl)
    raise ValueError(f'unknown program {kind!r}; one of gradient, update, '
                     'eval')

  def abstract_args(self, kind: str, *shape: int) -> tuple:
    """The arguments `jitted(kind)` is lowered with: the gradient step at
    (batch size, image size), the eval step at (batch size, eval size), the
    update step with no shape."""
    target = self.target
    if kind == 'gradient':
      return (target, self.batch_spec(*shape), self.hparams_spec())
    if kind == 'update':
      grads, stats = self._split_like_step_outputs(target)
      return (target, grads, stats, self.hparams_spec())
    if kind == 'eval':
      return (target.params, target.batch_stats,
              self.batch_spec(*shape, with_mask=True))
    raise ValueError(f'unknown program {kind!r}; one of gradient, update, '
                     'eval')

  def lower(self, kind: str, *shape: int):
    return self.jitted(kind).lower(*self.abstract_args(kind, *shape))


def task_from_config(config, *, mesh, model: state_lib.ModelSpec,
                     num_train_examples: int, total_epochs: float,
                     multi_label: bool = False,
                     terms: Sequence[LossTerm] = (),
                     extras: Sequence[ExtraNetwork] = ()) -> TrainTask:
  """The task an experiment config describes (the trainer's and the
  benchmarks' one way to build it)."""
  optimizer_config = dict(config.optimizer)
  return TrainTask(
      model, mesh=mesh,
      make_optimizer=lambda lr: optimizer_lib.build_from_config(
          optimizer_config, lr),
      schedule=dict(config.schedule), total_epochs=total_epochs,
      num_train_examples=num_train_examples,
      loss=ClassificationLoss(
          kind=config.train.loss, label_smoothing=config.train.label_smoothing,
          normalize_labels=bool(config.train.normalize_labels or multi_label)),
      terms=terms, extras=extras, seed=config.seed,
      weight_decay=config.optimizer.weight_decay,
      ema_decay=config.ema.decay, ema_ramp=config.ema.ramp,
      drop_path_rate=config.model.drop_path_rate,
      bn_groups=bn_group_count(config.model.bn_replicas_per_group,
                               mesh_lib.data_axis_size(mesh)),
      fsdp_min_size=config.mesh.fsdp_min_size)


def model_spec_from_config(config, *, num_classes: int, dtype
                           ) -> state_lib.ModelSpec:
  """The config's network (`config.model`)."""
  return state_lib.ModelSpec(
      config.model.arch, num_classes,
      drop_path_rate=config.model.drop_path_rate,
      bn_momentum=config.model.bn_momentum,
      bn_epsilon=config.model.bn_epsilon, dtype=dtype,
      conv_impl=config.model.conv_impl)
