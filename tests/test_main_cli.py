"""The trainer's command line: a user's mistake is one `error:` line, exit 2.

Each mistake runs `python -m effnetv2_jax.main` as a user would; all of them
fail while the flags are parsed, before TensorFlow, a device or a workdir is
touched.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from effnetv2_jax.training import config_checks, recipes

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run_main(args, tmp_path, workdir=True):
  """(exit status, stdout, stderr) of the entry point run from the repo."""
  command = [sys.executable, '-m', 'effnetv2_jax.main']
  if workdir:
    command.append(f'--workdir={tmp_path / "workdir"}')
  proc = subprocess.run(command + list(args), cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  return proc.returncode, proc.stdout, proc.stderr


# (arguments, whether --workdir is given, what the error line must contain)
MISTAKES = {
    'misspelt_key': (['--config.train.epoch=3'], True,
                     ['--config.train.epoch', 'did you mean train.epochs?']),
    'key_without_its_block': (['--config.batch_size=8'], True,
                              ['eval.batch_size', 'train.batch_size']),
    'unknown_key_lists_the_block': (
        ['--config.train.zzzz=1'], True,
        ['--config.train.zzzz',
         'train has: batch_size, epoch_examples, epochs']),
    'bad_variant': (['--config=configs/imagenet.py:q'], True,
                    ["variant 'q'", 's, m, l, xl, b0, b1, b2, b3']),
    'bad_preset': (['--config=configs/imagenet.py:s,offical'], True,
                   ["'offical'", 'official']),
    'bad_transfer_dataset': (['--config=configs/transfer.py:foo'], True,
                             ["'foo'", 'cifar100', 'flowers']),
    'bad_type': (['--config.train.epochs=abc'], True,
                 ['--config.train.epochs=abc', 'train.epochs takes a float']),
    'misspelt_config_file': (['--config=configs/imagenett.py'], True,
                             ['no such file',
                              'did you mean configs/imagenet.py?']),
    'missing_config_file': (['--config=configs/qqqq.py'], True,
                            ['configs/qqqq.py', 'digits.py, ']),
    'missing_workdir': ([], False, ['--workdir is required']),
    'unknown_flag': (['--workdirr=/tmp/nowhere'], False,
                     ['--workdirr', 'did you mean --workdir?']),
    'misspelt_config_prefix': (['--conifg.train.epochs=3'], True,
                               ['did you mean --config.train.epochs?']),
    'stray_argument': (['stray'], True,
                       ["'stray'", '--config, --coordinator_address, '
                        '--distributed, --num_processes, --process_id, '
                        '--workdir']),
    'value_after_a_boolean_flag': (['--distributed', 'true'], True,
                                   ['did you mean --distributed=true?']),
    'config_file_without_its_flag': (['configs/tiny.py'], True,
                                     ['did you mean --config=configs/tiny.py?']),
    'override_before_config': (
        ['--config.train.epochs=3', '--config=configs/tiny.py'], True,
        ['--config.train.epochs=3', 'put --config=<file> first']),
}


@pytest.mark.parametrize('name', sorted(MISTAKES))
def test_mistake_is_one_error_line_with_exit_status_2(name, tmp_path):
  args, workdir, expected = MISTAKES[name]
  status, stdout, stderr = _run_main(args, tmp_path, workdir)
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert status == 2, stderr[-3000:]
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith('error: '), lines
  for part in expected:
    assert part in lines[0], (part, lines[0])
  assert not stdout.strip()
  assert not (tmp_path / 'workdir').exists()  # nothing ran


def test_help_is_absl_help(tmp_path):
  status, stdout, stderr = _run_main(['--helpshort'], tmp_path, workdir=False)
  assert status == 1, stderr[-3000:]  # absl's status for --help
  assert '--workdir' in stdout and '--config' in stdout
  assert 'configs/digits.py' in stdout  # the default --config
  assert not stderr.strip()


def test_correct_command_line_reaches_the_config(tmp_path):
  """The default config is supplied before the overrides are read."""
  code = (
      'import json, sys\n'
      'from effnetv2_jax import cli, main\n'
      'cli.parse_flags(sys.argv, default_config=main._DEFAULT_CONFIG,\n'
      '                required=["workdir"])\n'
      'c = main._CONFIG.value\n'
      'print(json.dumps([c.experiment, c.train.epochs, c.model.arch,\n'
      '                  main._WORKDIR.value, main._DISTRIBUTED.value]))\n')
  runs = {
      'default': ['--workdir', '/w', '--config.train.epochs=3',
                  '--config.model.arch=b0'],
      'given': ['--config=configs/imagenet.py:m,official', '--distributed',
                '--workdir=/w', '--config.train.epochs', '7'],
  }
  results = {}
  for run, args in runs.items():
    proc = subprocess.run([sys.executable, '-c', code] + args, cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[run] = json.loads(proc.stdout.strip().splitlines()[-1])
  assert results['default'] == ['digits_quickstart', 3.0, 'b0', '/w', False]
  assert results['given'] == ['imagenet_m_official', 7.0, 'm', '/w', True]


def test_unknown_key_in_a_config_file_names_the_closest_key():
  config = recipes.base_config()
  config.train.epoch = 3.0
  config.data.zzzz_unrelated = 1
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.check_known_keys(config, recipes.base_config())
  message = str(error.value)
  assert 'train.epoch (did you mean train.epochs?)' in message
  assert 'data.zzzz_unrelated' in message
  assert 'data.zzzz_unrelated (' not in message  # nothing close to suggest
