"""The notebooks in colabs/ run top to bottom, on short settings.

Each notebook is executed whole on a Jupyter kernel of this interpreter
(nbclient, nbformat and ipykernel: the 'colab' extra), with its papermill
`parameters` cell replaced by the CI settings below, in a temporary
directory; a last cell run in the same kernel then checks what the notebook
made (a trained summary with a finite loss, a figure's axes, printed top-5
lines, ...). The kernel sees the machine as a user would: not the eight fake
CPU devices that conftest.py gives the rest of the suite.

The static checks (one parameters cell of literals, no stored outputs, an
install cell first, code that parses) need no Jupyter.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time

import pytest

COLABS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'colabs')
NOTEBOOKS = sorted(n[:-len('.ipynb')] for n in os.listdir(COLABS)
                   if n.endswith('.ipynb'))
CELL_TIMEOUT_S = 600

# Seconds-long settings; each key must be a parameter of the notebook.
CI_PARAMETERS = {
    'quickstart': dict(total_steps=16, num_stages=2, network='tiny',
                       table_variants=('b0',)),
    'progressive_stages': dict(images_per_stage=4),
    'pretrained_inference': dict(source='random'),
    'finetune_folder': dict(source='random', variant='tiny', image_size=32,
                            total_steps=12, batch_size=16),
    'nas_explorer': dict(overrides=['--config.search.num_trials=2',
                                    '--config.trial.progressive.num_stages=1']),
    'self_distillation': dict(total_steps=6, num_stages=1, network='tiny',
                              memory_budget_mb=8.0),
}

# Run after the notebook, in its kernel: what it must have made.
CHECKS = {
    'quickstart': '''
import math
assert summary['status'] == 'completed', summary['status']
assert math.isfinite(summary['eval']['loss']), summary['eval']
assert [s['settings']['image_size'] for s in summary['stages']] == [16, 32]
assert len(fig.axes) == 2, fig.axes
assert all(ax.lines for ax in fig.axes)
with open(os.path.join(workdir, 'summary.json')) as f:
  assert json.load(f)['final_step'] == 16
''',
    'progressive_stages': '''
assert len(plan) == config.progressive.num_stages == 4
assert len(fig.axes) == len(plan) * images_per_stage
assert [b.shape[1:3] for b in stage_images] == [
    (s.image_size, s.image_size) for s in plan]
assert [s.image_size for s in plan] == sorted(s.image_size for s in plan)
assert plan[0].image_size < plan[-1].image_size
''',
    'pretrained_inference': '''
assert len(results) == len(image_files) == 3
for path, top5 in results:
  assert len(top5) == 5
  probabilities = [p for _, p in top5]
  assert probabilities == sorted(probabilities, reverse=True)
  assert 0 < sum(probabilities) <= 1 + 1e-6
assert len(fig.axes) == len(image_files)
''',
    'finetune_folder': '''
import math
assert summary['status'] == 'completed'
assert math.isfinite(summary['eval']['loss']), summary['eval']
assert summary['num_classes'] == len(class_names) == 3
assert summary['init_from']['loaded'] > 0, summary['init_from']
assert len(predictions) == len(shown_files) > 0
assert all(label in class_names for label in predictions)
''',
    'nas_explorer': '''
import json
with open(os.path.join(workdir, 'trials.jsonl')) as f:
  events = [json.loads(line) for line in f]
completed = {e['trial_id'] for e in events if e['status'] == 'completed'}
assert len(completed) >= 3, completed  # the reference and 2 candidates
assert os.path.getsize(os.path.join(workdir, 'pareto.png')) > 0
with open(arch_file) as f:
  assert json.load(f)['stages']
''',
    'self_distillation': '''
import math
assert set(summaries) == {'stacked', 'label_heads'}
for summary in summaries.values():
  assert summary['status'] == 'completed'
  assert math.isfinite(summary['eval']['loss']), summary['eval']
  assert 0 <= summary['eval']['top1'] <= 1
table = summaries['stacked']['distillation']
assert 'extractor' in table and '\\n*' in table, table
assert 'label head' in summaries['label_heads']['distillation']
assert summaries['stacked']['num_params'] == summaries['label_heads']['num_params']
''',
}


def _read(name: str) -> dict:
  with open(os.path.join(COLABS, f'{name}.ipynb'), encoding='utf-8') as f:
    return json.load(f)


def _source(cell: dict) -> str:
  return ''.join(cell['source'])


def _python(cell: dict) -> str:
  """A code cell without its IPython magics (`%matplotlib inline`)."""
  return '\n'.join(line for line in _source(cell).splitlines()
                   if not line.lstrip().startswith('%'))


def _parameters_cell(notebook: dict) -> dict:
  cells = [c for c in notebook['cells']
           if 'parameters' in c['metadata'].get('tags', [])]
  assert len(cells) == 1, f'{len(cells)} cells tagged parameters'
  return cells[0]


def _parameters(source: str) -> dict:
  """name -> value of a parameters cell: plain assignments of literals."""
  values = {}
  for statement in ast.parse(source).body:
    assert isinstance(statement, ast.Assign), ast.dump(statement)
    (target,) = statement.targets
    values[target.id] = ast.literal_eval(statement.value)
  return values


def test_every_notebook_has_ci_settings_and_a_check():
  assert NOTEBOOKS == sorted(CI_PARAMETERS) == sorted(CHECKS)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_clean(name):
  notebook = _read(name)
  code = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  for cell in code:
    assert not cell['outputs'] and cell['execution_count'] is None, (
        f'{name} stores outputs: clear them before committing')
    ast.parse(_python(cell))
  assert 'find_spec' in _source(code[0]), 'the first code cell installs'
  defaults = _parameters(_source(_parameters_cell(notebook)))
  unknown = set(CI_PARAMETERS[name]) - set(defaults)
  assert not unknown, f'CI sets {unknown}, which {name} does not take'


def _ci_notebook(name: str):
  """The notebook with CI parameters and the check appended, as nbformat."""
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(os.path.join(COLABS, f'{name}.ipynb'), as_version=4)
  cell = next(c for c in notebook.cells
              if 'parameters' in c.metadata.get('tags', []))
  values = dict(_parameters(cell.source), **CI_PARAMETERS[name])
  cell.source = '\n'.join(f'{k} = {v!r}' for k, v in values.items())
  notebook.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
  return notebook


def _kernel_manager(directory):
  """A kernel manager for this interpreter's ipykernel, whatever kernels
  Jupyter finds elsewhere on the machine."""
  from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
  from jupyter_client.manager import AsyncKernelManager  # pylint: disable=g-import-not-at-top
  spec = directory / 'kernels' / 'effnetv2-ci'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher',
               '-f', '{connection_file}'],
      'display_name': 'effnetv2_jax CI', 'language': 'python'}))
  specs = KernelSpecManager(kernel_dirs=[str(directory / 'kernels')])
  return AsyncKernelManager(kernel_name='effnetv2-ci',
                            kernel_spec_manager=specs)


def _kernel_environment() -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags)
  env.pop('MPLBACKEND', None)  # the kernel's inline backend draws the figures
  return env


def _printed(notebook) -> str:
  """What the notebook's code cells printed (stdout and stderr)."""
  return ''.join(o.get('text', '') for c in notebook.cells
                 if c.cell_type == 'code' for o in c.outputs
                 if o.output_type == 'stream')


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
  pytest.importorskip('nbclient', reason="pip install -e '.[colab]'")
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  notebook = _ci_notebook(name)
  cwd = tmp_path / 'cwd'  # what the notebook writes: runs/, images, folders
  cwd.mkdir()
  client = NotebookClient(
      notebook, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
      shutdown_kernel='immediate', resources={'metadata': {'path': str(cwd)}})
  start = time.monotonic()
  client.execute(cleanup_kc=True, env=_kernel_environment())
  print(f'{name}: {time.monotonic() - start:.1f} s')
  printed = _printed(notebook)
  assert re.search(r'\w+ backend: \[\w*Device\(', printed), 'no device line'
  if name == 'pretrained_inference':
    # Under each image's path, its five classes: "   12.3%  tench (0)".
    top5_lines = re.findall(r'^ +\d+\.\d%  .+ \(\d+\)$', printed, re.M)
    assert len(top5_lines) == 5 * 3, printed[-2000:]
