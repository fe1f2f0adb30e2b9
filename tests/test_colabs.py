"""The notebooks stay in step with the package they import.

The stage-visualisation notebook is executed whole (it is cheap on digits);
the quickstart is executed up to, not including, its training cell, which is
what the quickstart test trains.
"""

import ast
import json
import os

import matplotlib
import pytest

matplotlib.use('Agg')

COLABS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'colabs')


def _code_cells(name):
  with open(os.path.join(COLABS, name)) as f:
    notebook = json.load(f)
  cells = []
  for cell in notebook['cells']:
    if cell['cell_type'] != 'code':
      continue
    # IPython magics and shell escapes are not Python.
    lines = [line for line in ''.join(cell['source']).splitlines()
             if not line.lstrip().startswith(('%', '!'))]
    cells.append('\n'.join(lines))
  return cells


@pytest.mark.parametrize('name', sorted(
    n for n in os.listdir(COLABS) if n.endswith('.ipynb')))
def test_notebook_cells_parse(name):
  cells = _code_cells(name)
  assert cells, f'{name} has no code'
  for source in cells:
    ast.parse(source)


def test_progressive_stages_notebook_runs():
  scope = {}
  for source in _code_cells('progressive_stages.ipynb'):
    exec(compile(source, 'progressive_stages.ipynb', 'exec'), scope)
  assert len(scope['fig'].axes) == 4 * 8


def test_quickstart_notebook_loads_the_digits_config():
  scope = {}
  for source in _code_cells('quickstart.ipynb')[:2]:
    exec(compile(source, 'quickstart.ipynb', 'exec'), scope)
  assert scope['config'].data.dataset == 'digits'
  assert callable(scope['train_and_evaluate'])
