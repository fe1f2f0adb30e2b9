"""Loading the experiment files in configs/ the way the command line does."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')


def load_config(name: str, arg=None, **overrides):
  """configs/<name>.py's get_config(arg), then dotted-key overrides
  (`**{'train.total_steps': 8}`)."""
  spec = importlib.util.spec_from_file_location(
      f'{name}_config', os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config
