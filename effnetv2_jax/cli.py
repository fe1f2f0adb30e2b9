"""The trainer's command line: each mistake ends in one line, exit status 2.

absl and ml_collections report a misspelt config key or a config file that
rejects its argument with a traceback, and other mistakes after "FATAL Flags
parsing error". `parse_flags` (the `flags_parser` of `app.run` in
`effnetv2_jax.main`) checks the command line before the flags are parsed and
turns every mistake into `error: <the flag or key>: <what is wrong>; <the
valid choices or a "did you mean">`, like the trainer's `ConfigError`s.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from typing import Any, Iterable, Iterator, Sequence

from absl import flags
from ml_collections.config_flags import config_path

from effnetv2_jax.training.config_checks import flat_keys

CONFIG_FLAG = 'config'
USAGE_EXIT_STATUS = 2

# Suggestions: difflib's similarity ratio (0-1) a key must reach, and how far
# below the best one another may be and still be offered.
_MIN_SIMILARITY = 0.6
_TIE = 0.05

# --config.<key>[=value], and --noconfig.<key> for a boolean key.
_OVERRIDE = re.compile(rf'^--?(?:no)?{CONFIG_FLAG}\.([^=]+)')


class CommandLineError(Exception):
  """A user's mistake on the command line; the message is one line."""


def parse_flags(argv: Sequence[str], *, default_config: str,
                required: Sequence[str] = ()) -> list[str]:
  """Parses absl's FLAGS from `argv`; a mistake prints one line and exits 2.

  Args:
    argv: the command line, program name first.
    default_config: the config file used when `argv` has no --config (so the
      --config flag itself is defined without a default: config_flags would
      load a default as the flag is defined, before any error could be
      reported here).
    required: flags that must be given.

  Returns:
    [program name]: a positional argument is a mistake too.
  """
  try:
    return _parse(list(argv), default_config, required)
  except (CommandLineError, flags.Error) as e:
    print(f'error: {_one_line(str(e))}', file=sys.stderr)
    sys.exit(USAGE_EXIT_STATUS)


def _parse(argv: list[str], default_config: str,
           required: Sequence[str]) -> list[str]:
  spec = config_argument(argv)
  if spec is None:
    spec = default_config
    argv.insert(1, f'--{CONFIG_FLAG}={spec}')
  config = load_config(spec, default_config)
  check_config_first(argv)
  for key in override_keys(argv):
    check_override_key(config, key)
  try:
    rest = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    raise CommandLineError(unknown_flag_message(e.flagname)) from None
  except flags.IllegalFlagValueError as e:
    raise CommandLineError(bad_value_message(str(e), config)) from None
  for name in required:
    if flags.FLAGS[name].value is None:
      what = flags.FLAGS[name].help
      raise CommandLineError(
          f'--{name} is required: {what[:1].lower()}{what[1:]}')
  if len(rest) > 1:
    raise CommandLineError(unexpected_argument_message(argv, rest[1]))
  return rest


def config_argument(argv: Sequence[str]) -> str | None:
  """The value of --config in `argv` (the last one wins), or None."""
  values = flags.FlagValues()
  flags.DEFINE_string(CONFIG_FLAG, None, '', flag_values=values)
  values(list(argv), known_only=True)
  return values[CONFIG_FLAG].value


def override_keys(argv: Sequence[str]) -> Iterator[str]:
  """The config keys of `--config.<key>[=value]` arguments, in order."""
  for arg in argv[1:]:
    if arg == '--':  # absl reads no flags after it
      return
    match = _OVERRIDE.match(arg)
    if match:
      yield match.group(1)


def check_config_first(argv: Sequence[str]) -> None:
  """config_flags defines the override flags when it reads --config."""
  config_at = next((i for i, arg in enumerate(argv)
                    if re.match(rf'^--?{CONFIG_FLAG}(=|$)', arg)), 0)
  for arg in argv[1:config_at]:
    if _OVERRIDE.match(arg):
      raise CommandLineError(f'{arg} comes before --{CONFIG_FLAG}: put '
                             f'--{CONFIG_FLAG}=<file> first')


def load_config(spec: str, default_config: str) -> Any:
  """`get_config([argument])` of the file in `spec` ('path[:argument]').

  This mirrors how config_flags loads it (the path as given, the text after
  the first ':' as the one argument), so a mistake is reported here, in one
  line, before config_flags would report it with a traceback.

  Args:
    spec: the value of --config.
    default_config: the default config file; its directory is where the
      project's configs are, to suggest from when `spec`'s does not exist.

  Raises:
    CommandLineError: no such file, no get_config, or get_config rejected its
      argument (ValueError, KeyError or TypeError). Other exceptions are bugs
      in the config file and keep their traceback.
  """
  path, colon, argument = spec.partition(':')
  if not os.path.isfile(path):
    raise CommandLineError(
        f'--{CONFIG_FLAG}={spec}: no such file; '
        + _config_file_hint(path, os.path.dirname(default_config)))
  module_spec = importlib.util.spec_from_file_location(
      f'{CONFIG_FLAG}_file', path)
  if module_spec is None:
    raise CommandLineError(f'--{CONFIG_FLAG}={spec}: not a Python file')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise CommandLineError(f'--{CONFIG_FLAG}={spec}: {path} defines no '
                           'get_config()')
  try:
    return get_config(argument) if colon else get_config()
  except KeyError as e:
    raise CommandLineError(f'--{CONFIG_FLAG}={spec}: unknown {e}') from None
  except (ValueError, TypeError) as e:
    raise CommandLineError(f'--{CONFIG_FLAG}={spec}: {e}') from None


def _config_file_hint(path: str, configs_dir: str) -> str:
  """'did you mean X?' over nearby config files, else the ones there are."""
  name = os.path.basename(path)
  if os.path.isfile(os.path.join(configs_dir, name)):
    # Most likely a relative path run from outside the source checkout.
    return f'did you mean {os.path.join(configs_dir, name)}?'
  here = os.path.dirname(path)
  for directory in dict.fromkeys((here or '.', configs_dir)):
    close = difflib.get_close_matches(name, _python_files(directory), n=1)
    if close:
      shown = here if directory == (here or '.') else directory
      return f'did you mean {os.path.join(shown, close[0])}?'
  return (f'the configs in {configs_dir}: '
          f'{", ".join(_python_files(configs_dir)) or "none"}')


def _python_files(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory)
                if n.endswith('.py') and not n.startswith('_'))


def check_override_key(config: Any, key: str) -> None:
  """Raises CommandLineError unless `key` ('a.b.c') names a field of `config`.

  config_flags would raise a KeyError naming only the last part; this names
  the whole key and suggests the closest of the config's keys.
  """
  if not hasattr(config, 'keys'):
    return  # not a ConfigDict: config_flags reports what it can
  try:
    parts = config_path.split(key)
  except (ValueError, SyntaxError):
    parts = tuple(key.split('.'))
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(part, str):
      return  # an index into a sequence: config_flags checks it
    if not hasattr(node, 'keys') or part not in node.keys():
      raise CommandLineError(
          f'--{CONFIG_FLAG}.{key}: no such config key; '
          + _key_hint(config, key, parts[:depth]))
    node = node[part]


def _key_hint(config: Any, key: str, found: Sequence[str]) -> str:
  """'did you mean ...?' over all keys, else the keys of the deepest block."""
  close = closest_keys(key, flat_keys(config))
  if close:
    return f'did you mean {" or ".join(close)}?'
  block = config
  for part in found:
    block = block[part]
  if not hasattr(block, 'keys'):
    return f'{".".join(found)} is a value, not a block of keys'
  where = f'{".".join(found)} has' if found else 'the config has'
  return f'{where}: {", ".join(sorted(block.keys()))}'


def closest_keys(key: str, known: Iterable[str]) -> list[str]:
  """The known keys nearest to `key`: the best match and any as good.

  Leading parts a candidate shares with `key` are left out of the comparison
  ('train.zzzz' is not close to 'train.loss'), and a key without a block
  ('epochs') is also compared with each key's last part ('train.epochs').
  """
  key_parts = key.split('.')

  def score(candidate: str) -> float:
    parts = candidate.split('.')
    shared = 0
    while (shared < min(len(parts), len(key_parts)) - 1
           and parts[shared] == key_parts[shared]):
      shared += 1
    ratio = difflib.SequenceMatcher(None, '.'.join(key_parts[shared:]),
                                    '.'.join(parts[shared:])).ratio()
    if len(key_parts) == 1:
      ratio = max(ratio,
                  difflib.SequenceMatcher(None, key, parts[-1]).ratio())
    return ratio

  scored = sorted(((score(k), k) for k in known), key=lambda s: -s[0])
  if not scored or scored[0][0] < _MIN_SIMILARITY:
    return []
  best = scored[0][0]
  return [k for r, k in scored[:3] if r >= best - _TIE]


def bad_value_message(absl_message: str, config: Any) -> str:
  """absl's 'flag --x=v: why', with the type a config key takes."""
  message = _one_line(absl_message).removeprefix('flag ')
  match = re.match(rf'--{CONFIG_FLAG}\.([^=]+)=', message)
  if not match:
    return message
  key = match.group(1)
  try:
    value = config_path.get_value(key, config)
  except (KeyError, AttributeError, IndexError, TypeError, ValueError):
    return message
  kind = ('True or False' if isinstance(value, bool)
          else f'a {type(value).__name__}')
  return f'{message}; {key} takes {kind} (the config has {value!r})'


def unknown_flag_message(name: str) -> str:
  """'unknown flag --x; did you mean --y?', or this program's flags."""
  head, dot, tail = name.partition('.')
  names = [n for n in flags.FLAGS if '.' not in n]
  close = difflib.get_close_matches(head, names, n=1)
  if close:
    return f'unknown flag --{name}; did you mean --{close[0]}{dot}{tail}?'
  return f'unknown flag --{name}; {_program_flags()}'


def unexpected_argument_message(argv: Sequence[str], argument: str) -> str:
  """Says how the positional `argument` was probably meant."""
  message = f'unexpected argument {argument!r}'
  index = argv.index(argument)
  before = argv[index - 1] if index > 1 else ''
  if before.startswith('-') and '=' not in before and before != '--':
    # A boolean flag (or a config key holding a bool or None) takes no
    # separate value.
    return f'{message}; did you mean {before}={argument}?'
  if argument.endswith('.py') or '.py:' in argument:
    return f'{message}; did you mean --{CONFIG_FLAG}={argument}?'
  return f'{message}; flags are written --name=value; {_program_flags()}'


def _program_flags() -> str:
  module = flags.FLAGS.find_module_defining_flag(CONFIG_FLAG)
  names = sorted(f.name for f in flags.FLAGS.get_flags_for_module(module)
                 if '.' not in f.name)
  listed = ', '.join(f'--{n}' for n in names)
  return (f'the flags are {listed} and --{CONFIG_FLAG}.<key>=<value> '
          '(--helpfull lists all)')


def _one_line(text: str) -> str:
  return ' '.join(text.split())
