"""Evaluation of the raw and EMA weights on one or more splits.

The eval step is one compiled program at the eval size (`Compiler`'s 'eval'
key), run over fixed-shape padded batches for the raw weights and, when the
run keeps them, the EMA weights. Results are cached per (step, split): the
stage-end and the final evaluation of the same step run once.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from effnetv2_jax.training import steps as steps_lib


class Evaluator:
  """`evaluator(state, step, split, image_size) -> metrics` (loss, top1,
  top5, ema_*); image_size defaults to the eval size.

  Args:
    compiler: gives the compiled eval step (`Compiler.get('eval', ...)`).
    make_iterator: (split name, image size) -> a re-iterable eval pass (made
      on first use and kept; `close` releases them).
    batch_size, image_size: the eval program's shape.
    reporter: receives the scalars (under 'eval' or 'eval_<split>', with
      '@<size>' at a size other than the eval size) and a line per
      evaluation.
    use_ema: also evaluate the EMA weights.
    default_split: the split whose scalars go under plain 'eval'.
  """

  def __init__(self, *, compiler, make_iterator: Callable[[str, int], Any],
               batch_size: int, image_size: int, reporter, use_ema: bool,
               default_split: str):
    self._compiler = compiler
    self._make_iterator = make_iterator
    self._iterators: dict[tuple[str, int], Any] = {}
    self._batch_size = batch_size
    self._image_size = image_size
    self._reporter = reporter
    self._use_ema = use_ema
    self._default_split = default_split
    self._results: dict[tuple[int, str, int], dict[str, float]] = {}

  def _iterator(self, split: str, image_size: int):
    key = (split, image_size)
    if key not in self._iterators:
      self._iterators[key] = self._make_iterator(split, image_size)
    return self._iterators[key]

  def __call__(self, state, step: int, split: str | None = None,
               image_size: int | None = None) -> dict[str, float]:
    split = split or self._default_split
    image_size = image_size or self._image_size
    key = (step, split, image_size)
    if key in self._results:
      return self._results[key]
    start = time.time()
    compiled, _ = self._compiler.get('eval', self._batch_size, image_size)
    weights = {'': (state.params, state.batch_stats)}
    if self._use_ema:
      weights['ema_'] = (state.ema_params, state.ema_batch_stats)
    data = self._iterator(split, image_size)
    result = _evaluate(compiled.executable, weights, data)
    result['eval_time_s'] = time.time() - start
    kind = 'eval' if split == self._default_split else f'eval_{split}'
    if image_size != self._image_size:
      kind += f'@{image_size}'
    self._reporter.scalars(step, kind, result)
    self._reporter.text(_describe(step, split, image_size,
                                  data.num_examples, result))
    self._results[key] = result
    return result

  def close(self) -> None:
    for iterator in self._iterators.values():
      close = getattr(iterator, 'close', None)
      if close is not None:
        close()
    self._iterators.clear()


def _evaluate(eval_step, weights: Mapping[str, tuple], data
              ) -> dict[str, float]:
  totals = {prefix: None for prefix in weights}
  for batch in data:
    for prefix, (params, batch_stats) in weights.items():
      sums = eval_step(params, batch_stats, batch)
      totals[prefix] = sums if totals[prefix] is None else jax.tree.map(
          jnp.add, totals[prefix], sums)
  result = {}
  for prefix, total in totals.items():
    result.update({prefix + k: v for k, v in
                   steps_lib.summarize_eval(jax.device_get(total)).items()})
  return result


def _describe(step: int, split: str, image_size: int, num_examples: int,
              result: Mapping[str, float]) -> str:
  ema = (f', EMA top-1 {100 * result["ema_top1"]:.2f}%'
         if 'ema_top1' in result else '')
  return (f'eval @ step {step} on {split} ({image_size}px, {num_examples} '
          f'images): top-1 {100 * result["top1"]:.2f}%, top-5 '
          f'{100 * result["top5"]:.2f}%, loss {result["loss"]:.4f}{ema} '
          f'[{result["eval_time_s"]:.1f}s]')
