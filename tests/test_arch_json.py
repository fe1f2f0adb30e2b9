"""--config.model.arch=path/to/arch.json: a network described in a JSON file.

The file holds an `Architecture.to_dict()` dict (possibly naming its
'family'); what a run reports and checkpoints is that dict, not the path.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from effnetv2_jax.models import arch, families
from effnetv2_jax.training import config_checks
from effnetv2_jax.training.state import ModelSpec

REPO = pathlib.Path(__file__).resolve().parent.parent

# A network no variant name gives: V1-B0's table, narrower and with the
# V1 rounding guard, as a NAS trial or a user would write it.
CUSTOM = arch.scaled(arch.get_architecture('efficientnet-b0'), width=0.5,
                     depth=0.5, head_channels=256, name='v1_b0_half')


def _write(path, content) -> str:
  path.write_text(content if isinstance(content, str) else json.dumps(content))
  return str(path)


def test_the_training_command_line_reads_the_json_file(tmp_path):
  """The README's command: config_flags lets a string replace digits.py's
  dict, and the trainer's model is the file's architecture."""
  arch_file = _write(tmp_path / 'a.json', CUSTOM.to_dict())
  code = (
      'import json, sys\n'
      'import jax.numpy as jnp\n'
      'from effnetv2_jax import cli, main\n'
      'from effnetv2_jax.training import config_checks, recipes, task\n'
      'cli.parse_flags(sys.argv, default_config=main._DEFAULT_CONFIG,\n'
      '                required=["workdir"])\n'
      'c = main._CONFIG.value\n'
      'config_checks.validate(c, num_devices=1,\n'
      '                       reference=recipes.base_config())\n'
      'model = task.model_spec_from_config(c, num_classes=10,\n'
      '                                    dtype=jnp.float32)\n'
      'print(json.dumps([c.model.arch, model.to_dict()]))\n')
  args = ['--config=configs/digits.py', f'--config.model.arch={arch_file}',
          f'--workdir={tmp_path / "workdir"}']
  proc = subprocess.run([sys.executable, '-c', code] + args, cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]
  given, stored = json.loads(proc.stdout.strip().splitlines()[-1])
  assert given == arch_file
  # What the summary ('architecture') and the checkpoints ('model') keep.
  assert stored == dict(CUSTOM.to_dict(), family='efficientnetv2')


def test_a_missing_file_is_one_error_line_naming_the_key_and_path(tmp_path):
  missing = tmp_path / 'nowhere' / 'arch.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'effnetv2_jax.main', '--config=configs/digits.py',
       f'--config.model.arch={missing}', f'--workdir={tmp_path / "w"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith('error: config.model.arch='), lines
  assert str(missing) in lines[0] and 'No such file' in lines[0]


def test_resolve_reads_a_file_with_or_without_its_family(tmp_path):
  with_family = _write(tmp_path / 'with.json',
                       dict(CUSTOM.to_dict(), family='efficientnetv2'))
  without = _write(tmp_path / 'without.json', CUSTOM.to_dict())
  for path in (with_family, without):
    assert config_checks.resolve_architecture(path) == CUSTOM
    assert families.family_of(path).name == 'efficientnetv2'
  # A JSON file without the .json suffix is a path by its directory part.
  plain = _write(tmp_path / 'arch_description', CUSTOM.to_dict())
  assert config_checks.resolve_architecture(plain) == CUSTOM


def test_model_spec_stores_the_dict_not_the_path(tmp_path):
  path = _write(tmp_path / 'b4.json', arch.get_architecture('v1-b4').to_dict())
  spec = ModelSpec(path, 1000)
  assert spec.description == arch.get_architecture('efficientnet-b4')
  assert spec.to_dict()['name'] == 'efficientnet-b4'
  assert spec.to_dict()['round_down_guard'] is True
  assert path not in json.dumps(spec.to_dict())
  assert (spec.train_size, spec.eval_size) == (380, 380)


@pytest.mark.parametrize('content,why', [
    ('{"name": "x", "stages": [', 'is not JSON'),
    ('[1, 2]', 'holds a JSON list'),
    (b'\xff\xfe\x00', 'is not a text file'),
    ('{"name": "x"}', 'stages'),
    ('{"family": "nope", "width": 4}', "unknown model family 'nope'"),
])
def test_a_bad_file_is_one_config_error_naming_the_key_and_path(
    tmp_path, content, why):
  path = tmp_path / 'bad.json'
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.resolve_architecture(str(path))
  message = str(error.value)
  assert message.startswith(f"config.model.arch='{path}'")
  assert why in message and '\n' not in message


def test_a_directory_is_a_config_error(tmp_path):
  with pytest.raises(config_checks.ConfigError, match='cannot read'):
    config_checks.resolve_architecture(str(tmp_path) + '/')


def test_variant_names_are_not_paths(tmp_path, monkeypatch):
  # A file named like a variant in the working directory changes nothing.
  monkeypatch.chdir(tmp_path)
  _write(tmp_path / 's', CUSTOM.to_dict())
  assert config_checks.resolve_architecture('s') == arch.get_architecture('s')
  assert not families.is_description_file('efficientnet-b4')
