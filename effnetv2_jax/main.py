r"""Command-line entry point: train (or resume) one experiment.

    python -m effnetv2_jax.main --workdir=/tmp/digits   # the digits quickstart
    python -m effnetv2_jax.main --config=configs/imagenet.py:s,official \
        --workdir=gs://bucket/effnetv2-s --config.data.data_dir=gs://bucket/tfds

Any config key can be overridden with --config.<key>=<value>. Restarting with
the same --workdir resumes from its latest checkpoint. A mistake on the
command line (a misspelt key or flag, a bad value or config argument) ends in
one `error:` line with the valid choices, exit status 2.
"""

import functools
import logging
import os
import sys

if __name__ == '__main__':
  # Before anything starts threads: XLA:CPU train steps run 1.1-1.8x faster
  # with huge pages and faster still with tcmalloc (host_memory.py says how
  # much); both act only at start-up.
  from effnetv2_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_for_host_memory()

# TensorFlow's C++ start-up banners (oneDNN, CUDA probing) are noise here.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from effnetv2_jax import cli  # pylint: disable=g-import-not-at-top

# With no --config the digits quickstart runs: it needs no download and
# finishes in minutes on a laptop CPU. configs/ sits beside the package in a
# source checkout (`pip install -e .`). cli.parse_flags supplies it: a
# default given to config_flags is loaded, with the command line's overrides,
# as the flag is defined, where a typo could only end in a traceback.
_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
    'digits.py')
_CONFIG = config_flags.DEFINE_config_file(
    cli.CONFIG_FLAG, None,
    'Experiment config file, optionally with :<argument>.', lock_config=True)
flags.FLAGS[cli.CONFIG_FLAG].default_as_str = repr(_DEFAULT_CONFIG)  # --help
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and summary.json.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() (one process per host): on TPU pods '
    'and SLURM/Kubernetes GPU clusters it detects the rest; elsewhere give '
    '--coordinator_address, --num_processes and --process_id.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 (with --distributed; default: detected).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in the job (with --distributed).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, "This process's index, 0-based (with --distributed).")

# Exit status after a SIGTERM checkpoint, so a scheduler restarts the job.
_PREEMPTED_EXIT = 143


def _quiet_libraries() -> None:
  """Our progress lines at INFO; orbax, clu, jax and TF only when it matters."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger('effnetv2_jax').setLevel(logging.INFO)


def _initialize_distributed(jax) -> None:
  """One process per host, coordinated by JAX; a bad combination of the
  flags is one line."""
  given = {'coordinator_address': _COORDINATOR.value,
           'num_processes': _NUM_PROCESSES.value,
           'process_id': _PROCESS_ID.value}
  explicit = {k: v for k, v in given.items() if v is not None}
  if explicit and len(explicit) != len(given):
    missing = sorted(set(given) - set(explicit))
    print(f'error: --distributed with {", ".join("--" + k for k in explicit)}'
          f' also needs --{" and --".join(missing)}', file=sys.stderr)
    sys.exit(cli.USAGE_EXIT_STATUS)
  if explicit and not 0 <= explicit['process_id'] < explicit['num_processes']:
    print(f'error: --process_id={explicit["process_id"]} is not in [0, '
          f'--num_processes={explicit["num_processes"]})', file=sys.stderr)
    sys.exit(cli.USAGE_EXIT_STATUS)
  jax.distributed.initialize(**explicit)


def main(argv):
  del argv  # cli.parse_flags has rejected positional arguments
  _quiet_libraries()
  # tf.data must not claim the accelerators JAX trains on.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (ValueError, RuntimeError):  # no such device type in this build
      pass
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    _initialize_distributed(jax)
  from effnetv2_jax.training import trainer  # pylint: disable=g-import-not-at-top
  try:
    _, summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (trainer.ConfigError, trainer.NonFiniteLossError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2 if isinstance(e, trainer.ConfigError) else 3)
  if summary['status'] == 'preempted':
    sys.exit(_PREEMPTED_EXIT)
  final = summary.get('eval') or {}
  if final:
    print(f'final eval: top-1 {100 * final["top1"]:.2f}%'
          + (f' (EMA {100 * final["ema_top1"]:.2f}%)' if 'ema_top1' in final
             else '')
          + f'; summary in {os.path.join(_WORKDIR.value, "summary.json")}')


if __name__ == '__main__':
  app.run(main, flags_parser=functools.partial(
      cli.parse_flags, default_config=_DEFAULT_CONFIG, required=['workdir']))
