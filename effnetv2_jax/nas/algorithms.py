"""Search algorithms over a `SearchSpace`, behind one small interface.

The search driver only ever sees `SearchAlgorithm`: propose() a list of
numbers (one option index per decision of the space), feedback() the trial's
reward, recover() from the ledger after a restart. Behind it sit PyGlove's
DNA generators (Peng et al. 2020, "PyGlove: Symbolic Programming for
Automated Machine Learning"): uniform random search, regularized evolution
(Real et al. 2019), NSGA-II (Deb et al. 2002) on the objectives tuple, and a
REINFORCE controller in the style of MnasNet (Tan et al. 2019) and TuNAS
(Bender et al. 2020), which PyGlove does not ship open-source.

Several trials run at once, so propose() may be called many times before
any feedback. PyGlove's evolution keeps its bookkeeping (initial population
or not, proposal and generation ids, fitness) as metadata on the proposed
DNA object, so proposals in flight are kept here and the very object goes
back with its feedback. The ledger stores numbers only; recover() rebuilds
that metadata (never deserialising anything: DNA is built from numbers).
"""

from __future__ import annotations

import collections
import random
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import pyglove as pg

from effnetv2_jax.nas import space as space_lib

ALGORITHMS = ('random', 'evolution', 'reinforce', 'nsga2')

History = Sequence[tuple[Sequence[int], float | None,
                         Sequence[float] | None]]

# Each algorithm's options and their defaults.
DEFAULT_OPTIONS = {
    'random': {},
    'evolution': {'population_size': 20, 'tournament_size': 5,
                  'mutation_prob': None},
    'nsga2': {'population_size': 20, 'mutation_prob': None},
    'reinforce': {'learning_rate': 0.05, 'baseline_decay': 0.95,
                  'entropy': 0.0, 'failed_reward': 0.0,
                  'optimizer': 'adam'},
}


class SearchAlgorithm(Protocol):
  """What the search driver asks of an algorithm."""

  multi_objective: bool

  def propose(self) -> list[int]:
    """The numbers of the next architecture to train."""

  def feedback(self, numbers: Sequence[int], reward: float | None,
               objectives: Sequence[float] | None = None) -> None:
    """A finished trial. reward None: the trial failed (REINFORCE learns
    the floor reward from it, evolution skips it). objectives: (accuracy,
    -normalised step time, -normalised params), all to maximise."""

  def recover(self, history: History) -> None:
    """Rebuilds the state from the ledger's (numbers, reward, objectives)
    in proposal order; called once, before any propose(). A reward of None
    is a failed trial: leave out trials that had not finished."""


def dna_spec(space: space_lib.SearchSpace) -> pg.DNASpec:
  """A flat list of `oneof`s whose DNA numbers are the space's numbers."""
  return pg.dna_spec(pg.List(
      [pg.oneof(list(range(len(d.options)))) for d in space.decisions]))


def make_algorithm(name: str, space: space_lib.SearchSpace, *, seed: int,
                   options: Mapping[str, Any] | None = None
                   ) -> SearchAlgorithm:
  """One of ALGORITHMS over `space`, deterministic from `seed`.

  Args:
    name: 'random', 'evolution', 'reinforce' or 'nsga2'.
    space: the search space.
    seed: a non-negative int.
    options: evolution: population_size (20), tournament_size (5),
      mutation_prob (None: one decision changes per child; p: each changes
      with probability p, at least one); nsga2: population_size (20),
      mutation_prob; reinforce: learning_rate (0.05), baseline_decay (0.95),
      entropy (0.0), failed_reward (0.0), optimizer ('adam' or 'sgd').
  """
  if name not in ALGORITHMS:
    raise ValueError(f'unknown search algorithm {name!r}; choose one of '
                     f'{", ".join(ALGORITHMS)}')
  if (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
      or seed < 0):
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  options = dict(options or {})
  unknown = sorted(set(options) - set(DEFAULT_OPTIONS[name]))
  if unknown:
    raise ValueError(
        f'unknown option(s) {", ".join(unknown)} for {name}; choose from '
        f'{", ".join(DEFAULT_OPTIONS[name]) or "none"}')
  settings = {**DEFAULT_OPTIONS[name], **options}
  return _BUILDERS[name](space, int(seed), settings)


def _random_search(space, seed, settings) -> GeneratorSearch:
  del settings
  return GeneratorSearch(space, pg.geno.Random(seed=seed))


def _reinforce_search(space, seed, settings) -> ReinforceSearch:
  # PyGlove's typed members refuse an int where they declare a float.
  numeric = {key: float(settings[key]) for key in
             ('learning_rate', 'baseline_decay', 'entropy')}
  return ReinforceSearch(
      space, Reinforce(seed=seed, optimizer=settings['optimizer'], **numeric),
      failed_reward=float(settings['failed_reward']))


def _evolution_search(space, seed, settings) -> EvolutionSearch:
  population = settings['population_size']
  tournament = settings['tournament_size']
  _check_population(population, tournament)
  mutation_prob = _probability(settings['mutation_prob'])

  def build(evolution_seed: int) -> pg.DNAGenerator:
    mutator_seed, select_seed = _split_seed(evolution_seed)
    return pg.evolution.regularized_evolution(
        ChoiceMutator(mutation_prob, seed=mutator_seed),
        population_size=population, tournament_size=tournament,
        seed=select_seed)

  return EvolutionSearch(space, build, seed=seed,
                         initial_population=population)


def _nsga2_search(space, seed, settings) -> ParetoSearch:
  population = settings['population_size']
  _check_population(population)
  mutation_prob = _probability(settings['mutation_prob'])

  def build(evolution_seed: int) -> pg.DNAGenerator:
    mutator_seed, select_seed = _split_seed(evolution_seed)
    return pg.evolution.nsga2(
        ChoiceMutator(mutation_prob, seed=mutator_seed),
        population_size=population, seed=select_seed)

  # PyGlove's NSGA-II starts from twice the population at random.
  return ParetoSearch(space, build, seed=seed,
                      initial_population=2 * population)


def _probability(value: Any) -> float | None:
  return None if value is None else float(value)


def _check_population(population: Any, tournament: Any = 2) -> None:
  for key, value in (('population_size', population),
                     ('tournament_size', tournament)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
      raise ValueError(f'{key} must be an int >= 2, got {value!r}')
  if population < tournament:
    raise ValueError(f'population_size {population} is smaller than '
                     f'tournament_size {tournament}')


def _split_seed(seed: int) -> tuple[int, int]:
  """Two independent seeds: PyGlove's operators each seed a
  `random.Random`, and equal seeds would draw the same stream."""
  first, second = np.random.SeedSequence(seed).generate_state(2)
  return int(first), int(second)


@pg.members([
    ('mutation_prob', pg.typing.Float(min_value=0.0, max_value=1.0)
     .noneable(), 'Per-decision change probability; None changes exactly '
     'one decision.'),
    ('seed', pg.typing.Int().noneable(), 'Random seed.'),
], init_arg_list=['mutation_prob', 'seed'])
class ChoiceMutator(pg.evolution.Mutator):
  """Changes decisions of a flat DNA to a different option.

  PyGlove's `Uniform` mutator redraws one node, which for a flat list is
  either one decision, often to its old value (a wasted trial), or the whole
  DNA at once. Every child here differs from its parent in at least one
  decision, and by default in exactly one.
  """

  def _on_bound(self):
    super()._on_bound()
    self._random = random.Random(self.seed)

  def mutate(self, dna: pg.DNA, global_state: Any = None,
             step: int = 0) -> pg.DNA:
    del global_state, step
    numbers = list(dna.to_numbers())
    sizes = [len(point.candidates) for point in dna.spec.decision_points]
    mutable = [i for i, size in enumerate(sizes) if size > 1]
    chosen = []
    if self.mutation_prob is not None:
      chosen = [i for i in mutable
                if self._random.random() < self.mutation_prob]
    if not chosen:
      chosen = [self._random.choice(mutable)]
    for i in chosen:
      numbers[i] = self._random.choice(
          [v for v in range(sizes[i]) if v != numbers[i]])
    return pg.DNA.from_numbers(numbers, dna.spec)


@pg.members([
    ('seed', pg.typing.Int(min_value=0), 'Random seed.'),
    ('learning_rate', pg.typing.Float(min_value=0.0, default=0.05),
     'Step size on the logits.'),
    ('baseline_decay', pg.typing.Float(min_value=0.0, max_value=1.0,
                                       default=0.95),
     'Decay of the exponential moving average of rewards.'),
    ('entropy', pg.typing.Float(min_value=0.0, default=0.0),
     'Weight of the entropy bonus (keeps the policy exploring).'),
    ('optimizer', pg.typing.Enum('adam', ['adam', 'sgd']),
     'Adam or plain gradient ascent on the logits.'),
])
class Reinforce(pg.geno.DNAGenerator):
  """A REINFORCE controller over a flat list of categorical decisions.

  Each decision has its own softmax over logits that start at 0 (uniform).
  A reward r of a sample moves the logits along (r - b) * grad log p(sample)
  (Williams 1992), b an exponential moving average of past rewards that
  starts at the first reward, so the first trial sets the scale rather than
  pushing the policy by its raw accuracy; an optional entropy bonus is added
  to the ascent direction. Proposal k draws from `numpy` keyed by (seed, k),
  so a recovered controller that is fed the history in the order the live
  one was has its logits and proposes what it would have.
  """

  def _setup(self) -> None:
    sizes = [len(point.candidates) for point in self.dna_spec.decision_points]
    self._logits = [np.zeros(size) for size in sizes]
    self._first_moment = [np.zeros(size) for size in sizes]
    self._second_moment = [np.zeros(size) for size in sizes]
    self._updates = 0
    self._baseline = None

  @property
  def logits(self) -> list[np.ndarray]:
    """Per decision, a copy of the current logits."""
    return [logits.copy() for logits in self._logits]

  @property
  def baseline(self) -> float | None:
    return self._baseline

  def probabilities(self) -> list[np.ndarray]:
    """Per decision, the softmax of its logits."""
    return [_softmax(logits) for logits in self._logits]

  def _propose(self) -> pg.DNA:
    rng = np.random.default_rng([self.seed, self.num_proposals])
    numbers = [int(rng.choice(len(p), p=p)) for p in self.probabilities()]
    return pg.DNA.from_numbers(numbers, self.dna_spec)

  def _feedback(self, dna: pg.DNA, reward: float) -> None:
    reward = float(reward)
    if self._baseline is None:
      self._baseline = reward
    advantage = reward - self._baseline
    self._baseline = (self.baseline_decay * self._baseline +
                      (1 - self.baseline_decay) * reward)
    directions = []
    for p, choice in zip(self.probabilities(), dna.to_numbers()):
      # d log p[choice] / d logits = onehot(choice) - p.
      direction = -advantage * p
      direction[choice] += advantage
      if self.entropy:
        log_p = np.log(np.maximum(p, 1e-30))
        direction += self.entropy * -p * (log_p + _entropy(p))
      directions.append(direction)
    self._ascend(directions)

  def _ascend(self, directions: list[np.ndarray]) -> None:
    if self.optimizer == 'sgd':
      for logits, direction in zip(self._logits, directions):
        logits += self.learning_rate * direction
      return
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    self._updates += 1
    for logits, m, v, g in zip(self._logits, self._first_moment,
                               self._second_moment, directions):
      m *= beta1
      m += (1 - beta1) * g
      v *= beta2
      v += (1 - beta2) * g * g
      m_hat = m / (1 - beta1**self._updates)
      v_hat = v / (1 - beta2**self._updates)
      logits += self.learning_rate * m_hat / (np.sqrt(v_hat) + eps)


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max())
  return shifted / shifted.sum()


def _entropy(p: np.ndarray) -> float:
  return float(-(p * np.log(np.maximum(p, 1e-30))).sum())


class GeneratorSearch:
  """`SearchAlgorithm` over a PyGlove DNA generator fed the scalar reward;
  failed trials are not fed back (random search needs no feedback at all)."""

  multi_objective = False

  def __init__(self, space: space_lib.SearchSpace,
               generator: pg.DNAGenerator):
    self.space = space
    self.dna_spec = dna_spec(space)
    self.generator = generator
    self.generator.setup(self.dna_spec)
    # numbers -> proposed DNA objects awaiting feedback, oldest first.
    self._in_flight = collections.defaultdict(collections.deque)
    self._started = False

  def propose(self) -> list[int]:
    self._started = True
    dna = self.generator.propose()
    numbers = [int(n) for n in dna.to_numbers()]
    self._in_flight[tuple(numbers)].append(dna)
    return numbers

  def feedback(self, numbers: Sequence[int], reward: float | None,
               objectives: Sequence[float] | None = None) -> None:
    fitness = self._fitness(reward, objectives)
    dna = self._take_in_flight(numbers)
    if fitness is not None:
      self.generator.feedback(dna, fitness)

  def recover(self, history: History) -> None:
    self._start_recovery()
    self.generator.recover(
        [(self._dna(numbers), self._fitness(reward, objectives))
         for numbers, reward, objectives in history])

  def _fitness(self, reward: float | None,
               objectives: Sequence[float] | None) -> Any:
    """What the generator is fed for a trial; None: nothing."""
    del objectives
    return None if reward is None else float(reward)

  def _dna(self, numbers: Sequence[int]) -> pg.DNA:
    self.space.choices(numbers)  # a one-line ValueError on bad numbers
    return pg.DNA.from_numbers([int(n) for n in numbers], self.dna_spec)

  def _take_in_flight(self, numbers: Sequence[int]) -> pg.DNA:
    """The proposed DNA object of `numbers` (it carries the generator's
    bookkeeping); a fresh one for a trial proposed before a restart."""
    self.space.choices(numbers)
    pending = self._in_flight.get(tuple(int(n) for n in numbers))
    if pending:
      return pending.popleft()
    return self._dna_from_elsewhere(numbers)

  def _dna_from_elsewhere(self, numbers: Sequence[int]) -> pg.DNA:
    return self._dna(numbers)

  def _start_recovery(self) -> None:
    if self._started:
      raise RuntimeError('recover() must be called once, before propose()')
    self._started = True


class ReinforceSearch(GeneratorSearch):
  """The REINFORCE controller; a failed trial is fed `failed_reward`."""

  def __init__(self, space: space_lib.SearchSpace, generator: Reinforce, *,
               failed_reward: float = 0.0):
    super().__init__(space, generator)
    self.failed_reward = failed_reward

  def _fitness(self, reward, objectives):
    del objectives
    return self.failed_reward if reward is None else float(reward)


class EvolutionSearch(GeneratorSearch):
  """PyGlove evolution (regularized evolution here) on the scalar reward.

  Args:
    space: the search space.
    build: seed -> the `pg.evolution.Evolution` generator.
    seed: the search's seed.
    initial_population: how many rewarded trials the generator draws at
      random before it evolves (PyGlove's `population_init` size).
  """

  def __init__(self, space: space_lib.SearchSpace,
               build: Callable[[int], pg.DNAGenerator], *, seed: int,
               initial_population: int):
    super().__init__(space, build(seed))
    self._build = build
    self._seed = seed
    self.initial_population = initial_population

  @property
  def population(self) -> list[list[int]]:
    """The numbers of the current population (the parents' pool)."""
    return [[int(n) for n in dna.to_numbers()]
            for dna in self.generator.population]

  def recover(self, history: History) -> None:
    self._start_recovery()
    history = list(history)
    # A new random stream for the restarted run: the first run's seed
    # would redraw the initial population it already proposed.
    self.generator = self._build(int(np.random.SeedSequence(
        [self._seed, len(history)]).generate_state(1)[0]))
    self.generator.setup(self.dna_spec)
    replay = []
    rewarded = 0
    generation = 1
    for proposal_id, (numbers, reward, objectives) in enumerate(history, 1):
      fitness = self._fitness(reward, objectives)
      # Live, a proposal is initial while fewer rewards than the initial
      # population have come back; the ledger's order is the proposal order.
      initial = rewarded < self.initial_population
      if not initial:
        generation += 1
      replay.append((self._with_metadata(
          self._dna(numbers), proposal_id=proposal_id,
          generation_id=1 if initial else generation, initial=initial),
                     fitness))
      rewarded += fitness is not None
    self.generator.recover(replay)

  def _dna_from_elsewhere(self, numbers):
    return self._with_metadata(
        self._dna(numbers), proposal_id=self.generator.num_proposals,
        generation_id=max(1, self.generator.num_generations), initial=False)

  @staticmethod
  def _with_metadata(dna: pg.DNA, *, proposal_id: int, generation_id: int,
                     initial: bool) -> pg.DNA:
    base = pg.evolution.base
    dna.set_metadata(base.DNA_METADATA_PROPOSAL_ID, proposal_id)
    dna.set_metadata(base.DNA_METADATA_GENERATION_ID, generation_id)
    dna.set_metadata(base.DNA_METADATA_INITIAL_POPULATION, initial)
    return dna


class ParetoSearch(EvolutionSearch):
  """NSGA-II on the objectives tuple (all maximised); a failed trial is
  skipped."""

  multi_objective = True

  def _fitness(self, reward, objectives):
    if reward is None:
      return None
    if objectives is None:
      raise ValueError('nsga2 needs the trial objectives (accuracy, '
                       '-step time, -params), got objectives=None')
    return tuple(float(o) for o in objectives)

  def front(self) -> list[tuple[list[int], tuple[float, ...]]]:
    """The non-dominated (numbers, objectives) among what the algorithm
    holds: its elites and the trials not yet sorted into them."""
    held = list(self.generator.global_state.get('elites', []))
    held += self.generator.population
    fitness = [pg.evolution.get_fitness(dna) for dna in held]
    return [([int(n) for n in dna.to_numbers()], tuple(f))
            for dna, f in zip(held, fitness)
            if not any(pg.evolution.nsga2_lib.dominates(other, f)
                       for other in fitness)]


_BUILDERS = {
    'random': _random_search,
    'evolution': _evolution_search,
    'reinforce': _reinforce_search,
    'nsga2': _nsga2_search,
}
