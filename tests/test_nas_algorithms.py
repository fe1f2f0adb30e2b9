"""NAS search algorithms: valid proposals, trials in flight, recovery."""

from __future__ import annotations

import numpy as np
import pyglove as pg
import pytest

from effnetv2_jax.nas import algorithms
from effnetv2_jax.nas import space as space_lib

SMALL_OPTIONS = {
    'random': {},
    'evolution': {'population_size': 6, 'tournament_size': 3},
    'reinforce': {},
    'nsga2': {'population_size': 4},
}


@pytest.fixture(scope='module')
def space():
  return space_lib.SearchSpace(space_lib.backbone('tiny'))


def _make(name, space, seed=0, **options):
  return algorithms.make_algorithm(
      name, space, seed=seed, options={**SMALL_OPTIONS[name], **options})


def _valid(space, numbers) -> bool:
  space.decode(numbers)  # raises on anything outside the space
  return isinstance(numbers, list) and all(type(n) is int for n in numbers)


def _score(numbers, rng):
  """A made-up trial: reward, objectives (accuracy, -time, -params)."""
  accuracy = 0.5 + 0.05 * sum(numbers) / len(numbers) + 0.01 * rng.random()
  objectives = (accuracy, -1 - 0.1 * numbers[0] - 0.01 * rng.random(),
                -1 - 0.1 * numbers[3] - 0.01 * rng.random())
  return accuracy, objectives


def _hamming(a, b) -> int:
  return sum(x != y for x, y in zip(a, b))


def _run(algorithm, space, rounds, in_flight, rng, fail_every=0):
  """Proposes `in_flight` trials at a time, feeds them back out of order;
  returns the (numbers, reward, objectives) history in proposal order."""
  history = []
  count = 0
  for _ in range(rounds):
    batch = [algorithm.propose() for _ in range(in_flight)]
    results = []
    for numbers in batch:
      assert _valid(space, numbers)
      count += 1
      reward, objectives = _score(numbers, rng)
      if fail_every and count % fail_every == 0:
        reward = None
      results.append((numbers, reward, objectives))
    history += results
    for numbers, reward, objectives in reversed(results):
      algorithm.feedback(numbers, reward, objectives)
  return history


@pytest.mark.parametrize('name', algorithms.ALGORITHMS)
def test_proposals_are_valid_with_trials_in_flight(name, space):
  algorithm = _make(name, space)
  assert algorithm.multi_objective == (name == 'nsga2')
  rng = np.random.default_rng(0)
  # More trials in flight than the initial population, before any feedback.
  early = [algorithm.propose() for _ in range(12)]
  assert all(_valid(space, n) for n in early)
  for numbers in early:
    algorithm.feedback(numbers, *_score(numbers, rng))
  _run(algorithm, space, rounds=6, in_flight=4, rng=rng, fail_every=5)


@pytest.mark.parametrize('name', algorithms.ALGORITHMS)
def test_recover_then_propose(name, space):
  rng = np.random.default_rng(1)
  live = _make(name, space)
  history = _run(live, space, rounds=5, in_flight=3, rng=rng, fail_every=4)
  recovered = _make(name, space)
  recovered.recover(history)
  _run(recovered, space, rounds=3, in_flight=3, rng=rng)
  with pytest.raises(RuntimeError):
    recovered.recover(history)


def test_recover_after_propose_is_an_error(space):
  algorithm = _make('random', space)
  algorithm.propose()
  with pytest.raises(RuntimeError, match='before propose'):
    algorithm.recover([])


def test_same_seed_same_proposals(space):
  for name in algorithms.ALGORITHMS:
    runs = []
    for seed in (3, 3, 4):
      algorithm = _make(name, space, seed=seed)
      history = _run(algorithm, space, rounds=8, in_flight=2,
                     rng=np.random.default_rng(0))
      runs.append([numbers for numbers, _, _ in history])
    assert runs[0] == runs[1], name
    assert runs[0] != runs[2], name


def test_random_recovery_continues_the_same_stream(space):
  live = _make('random', space, seed=5)
  proposals = [live.propose() for _ in range(10)]
  recovered = _make('random', space, seed=5)
  recovered.recover([(n, 0.5, None) for n in proposals[:6]])
  assert [recovered.propose() for _ in range(4)] == proposals[6:]


def test_evolution_children_are_one_mutation_from_the_population(space):
  algorithm = _make('evolution', space)
  rng = np.random.default_rng(2)
  _run(algorithm, space, rounds=3, in_flight=3, rng=rng)  # 9 >= 6 rewarded
  for _ in range(10):
    population = algorithm.population
    assert len(population) == 6
    children = [algorithm.propose() for _ in range(3)]
    for child in children:
      # One decision from its parent (it may equal another member).
      assert 1 in {_hamming(child, parent) for parent in population}
    for child in children:
      algorithm.feedback(child, *_score(child, rng))


def test_evolution_feedback_returns_the_proposed_dna(space):
  algorithm = _make('evolution', space)
  proposals = [algorithm.propose() for _ in range(3)]
  for numbers in reversed(proposals):
    algorithm.feedback(numbers, 0.5)
  # PyGlove's bookkeeping rides on the proposed DNA object itself.
  assert [pg.evolution.base.get_proposal_id(dna)
          for dna in algorithm.generator.population] == [3, 2, 1]


def test_evolution_recovers_its_population_and_breeds_from_the_best(space):
  rng = np.random.default_rng(3)
  history = []
  for i in range(14):
    numbers = space.random_numbers(rng)
    reward = None if i in (2, 9) else float(rng.random())
    history.append((numbers, reward, None))
  rewarded = [(n, r) for n, r, _ in history if r is not None]
  # Tournament over the whole population: every parent is the best member.
  algorithm = _make('evolution', space, population_size=8,
                    tournament_size=8)
  algorithm.recover(history)
  assert algorithm.population == [n for n, _ in rewarded[-8:]]
  best = max(rewarded[-8:], key=lambda item: item[1])[0]
  children = [algorithm.propose() for _ in range(5)]  # all in flight
  assert all(_hamming(child, best) == 1 for child in children)


def test_evolution_recovery_before_the_population_is_full(space):
  live = _make('evolution', space)  # population 6: still drawing at random
  history = [(live.propose(), reward, None)
             for reward in (0.5, None, 0.7, 0.6, None)]
  recovered = _make('evolution', space)
  recovered.recover(history)
  assert len(recovered.population) == 3
  proposals = [recovered.propose() for _ in range(5)]
  assert all(_valid(space, n) for n in proposals)
  # The restarted run draws a new random stream, not the first run's again.
  assert not {tuple(n) for n in proposals} & {tuple(n) for n, _, _ in history}


def _fused_reward(numbers) -> float:
  return 1.0 if numbers[0] == space_lib.BLOCKS.index('fused_mbconv') else 0.0


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
def test_reinforce_moves_toward_the_rewarded_choice(space, optimizer):
  options = {'optimizer': optimizer}
  if optimizer == 'sgd':
    options['learning_rate'] = 1.0
  algorithm = _make('reinforce', space, **options)
  assert algorithm.generator.probabilities()[0][1] == pytest.approx(0.5)
  history = []
  for _ in range(15):
    batch = [algorithm.propose() for _ in range(2)]
    for numbers in batch:
      history.append((numbers, _fused_reward(numbers), None))
      algorithm.feedback(numbers, _fused_reward(numbers))
  assert algorithm.generator.probabilities()[0][1] > 0.8

  recovered = _make('reinforce', space, **options)
  recovered.recover(history)
  for live, replayed in zip(algorithm.generator.logits,
                            recovered.generator.logits):
    np.testing.assert_array_equal(live, replayed)
  assert recovered.generator.baseline == algorithm.generator.baseline
  assert [recovered.propose() for _ in range(3)] == [
      algorithm.propose() for _ in range(3)]


def test_reinforce_failed_trials_get_the_floor(space):
  first, second = [0] * len(space.decisions), [1] * len(space.decisions)

  def logits_after(reward, **options):
    algorithm = _make('reinforce', space, optimizer='sgd', **options)
    algorithm.feedback(first, 1.0)
    algorithm.feedback(second, reward)
    return algorithm.generator.logits

  failed = logits_after(None)
  for a, b in zip(failed, logits_after(0.0)):
    np.testing.assert_array_equal(a, b)
  # A floor below the baseline makes the failed sample's choices less likely.
  assert failed[0][1] < 0
  lower = logits_after(None, failed_reward=-1.0)
  assert lower[0][1] < failed[0][1]
  assert not np.array_equal(failed[0], logits_after(0.5)[0])


def test_reinforce_entropy_bonus_pulls_toward_uniform(space):
  rng = np.random.default_rng(7)
  samples = [space.random_numbers(rng) for _ in range(20)]
  probabilities = []
  for entropy in (0.0, 0.5):
    algorithm = _make('reinforce', space, optimizer='sgd', learning_rate=1.0,
                      entropy=entropy)
    for numbers in samples:
      algorithm.feedback(numbers, _fused_reward(numbers))
    probabilities.append(algorithm.generator.probabilities()[0][1])
  plain, bonus = probabilities
  assert 0.5 < bonus < plain


def test_nsga2_front_leaves_out_dominated_points(space):
  algorithm = _make('nsga2', space)  # population 4: 8 random first
  proposals = [algorithm.propose() for _ in range(8)]
  front_points = {(0.9, -1.0, -1.0), (0.95, -1.5, -1.2), (0.3, -0.4, -3.0),
                  (0.6, -0.9, -0.9)}
  dominated = [(0.5, -1.0, -1.0), (0.55, -1.2, -1.1),  # by (0.9, -1, -1)
               (0.4, -2.0, -2.0), (0.2, -3.0, -3.0)]
  objectives = sorted(front_points) + dominated
  order = np.random.default_rng(5).permutation(8)
  for numbers, i in zip(proposals, order):
    algorithm.feedback(numbers, objectives[i][0], objectives[i])
  front = algorithm.front()
  assert {o for _, o in front} == front_points
  for _, a in front:
    assert not any(pg.evolution.nsga2_lib.dominates(b, a) for _, b in front)
  # The initial population is in: children are mutations of the elites.
  elites = [n for n, _ in front]
  rng = np.random.default_rng(6)
  for _ in range(4):
    child = algorithm.propose()
    assert 1 in {_hamming(child, elite) for elite in elites}
    algorithm.feedback(child, *_score(child, rng))
  with pytest.raises(ValueError, match='objectives'):
    algorithm.feedback(algorithm.propose(), 0.5, None)


@pytest.mark.parametrize('mutation_prob', [None, 0.0, 1.0])
def test_mutator_changes_one_decision_or_each_with_mutation_prob(
    space, mutation_prob):
  spec = algorithms.dna_spec(space)
  mutator = algorithms.ChoiceMutator(mutation_prob, seed=0)
  rng = np.random.default_rng(8)
  for _ in range(10):
    parent = space.random_numbers(rng)
    child = mutator.mutate(pg.DNA.from_numbers(parent, spec)).to_numbers()
    assert _valid(space, child)
    expected = len(parent) if mutation_prob == 1.0 else 1
    assert _hamming(child, parent) == expected


def test_int_settings_are_accepted(space):
  for name, options in (('reinforce', {'learning_rate': 1, 'entropy': 0}),
                        ('evolution', {'mutation_prob': 1}),
                        ('nsga2', {'mutation_prob': 0})):
    algorithm = _make(name, space, **options)
    assert _valid(space, algorithm.propose())


def test_dna_spec_numbers_round_trip(space):
  spec = algorithms.dna_spec(space)
  rng = np.random.default_rng(6)
  for _ in range(20):
    numbers = space.random_numbers(rng)
    assert pg.DNA.from_numbers(numbers, spec).to_numbers() == numbers


def test_feedback_of_numbers_outside_the_space_is_a_value_error(space):
  for name in algorithms.ALGORITHMS:
    algorithm = _make(name, space)
    with pytest.raises(ValueError):
      algorithm.feedback([99] * len(space.decisions), 0.5, (0.5, -1, -1))
    with pytest.raises(ValueError):
      algorithm.recover([([0], 0.5, None)])


def test_make_algorithm_rejects_bad_settings(space):
  with pytest.raises(ValueError, match='unknown search algorithm'):
    algorithms.make_algorithm('bayesian', space, seed=0)
  with pytest.raises(ValueError, match='unknown option'):
    algorithms.make_algorithm('evolution', space, seed=0,
                              options={'learning_rate': 0.1})
  with pytest.raises(ValueError, match='seed'):
    algorithms.make_algorithm('random', space, seed=-1)
  with pytest.raises(ValueError, match='tournament_size'):
    algorithms.make_algorithm('evolution', space, seed=0,
                              options={'population_size': 4,
                                       'tournament_size': 5})
