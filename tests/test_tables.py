"""`python -m effnetv2_jax.tables`: the paper's tables beside ours.

Our columns must come from our code (the architecture, the configs' plans,
the trainer's step, the results registry); the paper's columns are the
published figures (Tan & Le 2021, Tables 3, 6, 7, 8).
"""

import json
import os
from pathlib import Path

import jax
import pytest

from config_files import load_config
from effnetv2_jax import tables
from effnetv2_jax.models import arch
from effnetv2_jax.nas import space as space_lib
from effnetv2_jax.tables import fused, paper, registry
from effnetv2_jax.training import progressive


def _run(capsys, *argv):
  assert tables.main(list(argv)) == 0
  return capsys.readouterr().out


def _json(capsys, *argv):
  return json.loads(_run(capsys, *argv, '--json'))


# --------------------------------------------------------------------------
# The JAX platform is the environment's.


def test_no_module_of_the_package_chooses_the_jax_platform():
  package = Path(tables.__file__).parent
  for path in package.glob('*.py'):
    assert 'JAX_PLATFORMS' not in path.read_text(), path.name


def test_running_a_table_leaves_the_platform_unset(monkeypatch, capsys):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  _run(capsys, 'progressive', '--variant', 's', '--preset', 'paper')
  assert 'JAX_PLATFORMS' not in os.environ


# --------------------------------------------------------------------------
# Table 3: Fused-MBConv in EfficientNet-B4.


def _independent_param_count(a: arch.Architecture, num_classes=1000) -> int:
  """Trainable parameters from the block table: conv kernels, BN scale and
  offset, SE convolutions with biases, the classifier with its bias."""
  bn = lambda c: 2 * c
  total = 3 * 3 * 3 * a.stem_channels + bn(a.stem_channels)
  for stage in a.stage_blocks():
    for b in stage:
      k, cin, cout, mid = b.kernel_size, b.in_channels, b.out_channels, \
          b.mid_channels
      if b.fused and b.expand_ratio == 1:
        total += k * k * cin * cout + bn(cout)
        width = cout
      elif b.fused:
        total += k * k * cin * mid + bn(mid) + mid * cout + bn(cout)
        width = mid
      else:
        total += (cin * mid + bn(mid) if b.expand_ratio != 1 else 0)
        total += k * k * mid + bn(mid) + mid * cout + bn(cout)
        width = mid
      if b.se_channels:
        total += 2 * width * b.se_channels + b.se_channels + width
  last = a.stage_blocks()[-1][-1].out_channels
  total += last * a.head_width + bn(a.head_width)
  return total + a.head_width * num_classes + num_classes


def test_independent_count_reproduces_b4s_published_params():
  b4 = arch.get_architecture('efficientnet-b4')
  assert _independent_param_count(b4) == 19_341_616


@pytest.fixture(scope='module')
def fused_rows():
  return fused.rows(throughput=False)


def test_fused_rows_are_counted_from_the_architecture(fused_rows):
  assert [r['fused_stages'] for r in fused_rows] == [0, 3, 5, 7]
  for row in fused_rows:
    a = fused.fused_b4(row['fused_stages'])
    assert row['params'] == _independent_param_count(a)
  # Fusing adds parameters and MACs: dense k x k convolutions on wide maps.
  params = [r['params'] for r in fused_rows]
  gmacs = [r['gmacs'] for r in fused_rows]
  assert params == sorted(params) and gmacs == sorted(gmacs)


@pytest.mark.parametrize('num_fused', [3, 7])
def test_fused_b4_is_the_search_spaces_fused_mbconv(num_fused):
  b4 = arch.get_architecture('efficientnet-b4')
  space = space_lib.SearchSpace(b4)
  choices = [{'block': 'fused_mbconv' if i < num_fused else 'mbconv',
              'layers': b4.round_repeats(s.repeats),
              'kernel': s.kernel_size, 'expand': s.expand_ratio}
             for i, s in enumerate(b4.stages)]
  decoded = space.decode(space.encode(choices))
  assert (decoded.stage_blocks() ==
          fused.fused_b4(num_fused).stage_blocks())


def test_fused_paper_columns_are_table_3(fused_rows, capsys):
  published = [(r['paper']['params_m'], r['paper']['flops_b'],
                r['paper']['tpu_img_s']) for r in fused_rows]
  assert published == [(19.3, 4.5, 262), (20.0, 7.5, 362),
                       (43.4, 21.3, 327), (132.0, 34.4, 254)]
  # The plain B4 is B4: within the paper's rounding of its 19.3M.
  assert round(fused_rows[0]['params'] / 1e6, 1) == 19.3
  out = _run(capsys, 'fused', '--no-throughput')
  assert 'Fused stage1-5' in out and '43.4' in out and '[checked]' in out


def test_fused_note_alternative_reads_as_it_says():
  # The note's claim: 3x3 fused kernels with SE kept give Table 3's 20.0M.
  a = fused.fused_b4(3, kernel_size=3, squeeze_excite=True)
  assert round(_independent_param_count(a) / 1e6, 1) == 20.0


def test_fused_b4_names_a_bad_stage_count():
  with pytest.raises(ValueError, match='num_fused must be in 0..7'):
    fused.fused_b4(8)


# --------------------------------------------------------------------------
# Table 6: progressive settings.


def _expected_plan(variant, preset):
  config = load_config('imagenet', f'{variant},{preset}')
  settings = config.progressive.to_dict()
  settings['max_image_size'] = (settings['max_image_size'] or
                                arch.get_architecture(variant).train_size)
  return progressive.plan_from_config(
      settings, epochs=config.train.epochs,
      num_train_examples=config.train.epoch_examples,
      batch_size=config.train.batch_size)


def test_progressive_rows_are_the_trainers_plans(capsys):
  rows = _json(capsys, 'progressive', '--variant', 's', '--variant', 'm',
               '--variant', 'b0')
  assert [(r['variant'], r['preset']) for r in rows] == [
      ('s', 'paper'), ('s', 'official'), ('m', 'paper'), ('m', 'official'),
      ('b0', 'paper'), ('b0', 'official')]
  for row in rows:
    expected = _expected_plan(row['variant'], row['preset'])
    assert row['stages'] == [s.to_dict() for s in expected]


def test_progressive_paper_column_is_table_6(capsys):
  rows = {(r['variant'], r['preset']): r
          for r in _json(capsys, 'progressive')}
  # Table 6's S column (min -> max): 128 -> 300 px, RandAugment 5 -> 15,
  # mixup 0 -> 0, dropout 0.1 -> 0.3.
  s = rows['s', 'paper']
  assert s['paper']['image_size'] == [128, 300]
  assert s['paper']['randaug_magnitude'] == [5, 15]
  assert s['paper']['dropout_rate'] == [0.1, 0.3]
  assert (s['stages'][0]['image_size'], s['stages'][-1]['image_size']) == (
      128, 300)
  for variant in ('s', 'm', 'l'):
    assert rows[variant, 'paper']['differs_from_paper'] == []
  # The official code starts at 171 px, caps RandAugment at 10 and keeps
  # dropout at 0.2.
  assert rows['s', 'official']['differs_from_paper'] == [
      'image_size', 'randaug_magnitude', 'dropout_rate']
  assert rows['m', 'paper']['paper']['tag'] == paper.RECALLED
  assert rows['xl', 'paper']['paper'] is None
  text = _run(capsys, 'progressive')
  assert '[recalled]' in text and 'unverified against the paper' in text


# --------------------------------------------------------------------------
# Training speed on the present device.


def test_speed_times_the_trainers_step_here(capsys):
  rows = _json(capsys, 'speed', '--variants', 'micro', '--batch', '2',
               '--size', '32', '--steps', '1')
  (row,) = rows
  assert (row['variant'], row['batch'], row['image_size']) == ('micro', 2, 32)
  assert row['images_per_sec'] > 0 and row['compile_s'] > 0
  assert row['device'].startswith(jax.devices()[0].device_kind)
  assert row['paper_train_hours'] is None  # micro is not in Table 7


def test_speed_paper_column_is_table_7s_training_time():
  from effnetv2_jax.tables import speed
  # 7.1 h for 350 epochs of 1,256,144 images on 32 TPUv3 cores.
  assert speed.paper_images_per_core('s') == pytest.approx(
      350 * 1_256_144 / (7.1 * 3600) / 32)
  assert speed.paper_images_per_core('b0') is None


def test_speed_names_an_unknown_variant(capsys):
  with pytest.raises(SystemExit):
    tables.main(['speed', '--variants', 'b9'])
  assert "unknown variant 'b9'" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Tables 7 and 8: accuracy from the results registry.


def _write_summary(workdir: Path, experiment: str, status='completed'):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'summary.json').write_text(json.dumps({
      'experiment': experiment, 'status': status, 'final_step': 107_336,
      'eval': {'top1': 0.8301, 'ema_top1': 0.83125},
      'eval_image_size': 384, 'backend': 'tpu', 'devices': 32}))


@pytest.fixture
def registry_path(tmp_path):
  path = tmp_path / 'results.json'
  path.write_text(json.dumps({'schema': 1, 'runs': {}}))
  return path


def test_the_shipped_registry_loads():
  assert isinstance(registry.load(), dict)


def test_imagenet_rows_without_a_run_say_so(capsys, registry_path):
  rows = _json(capsys, 'imagenet', '--registry', str(registry_path))
  assert rows and all(r['ours'] is None for r in rows)
  s = next(r for r in rows if (r['variant'], r['pretraining'], r['preset'])
           == ('s', '1k', 'paper'))
  assert s['paper']['top1'] == 83.9  # Table 7
  xl = next(r for r in rows if r['variant'] == 'xl')
  assert xl['paper']['top1'] == 87.3 and xl['pretraining'] == '21k'
  text = _run(capsys, 'imagenet', '--registry', str(registry_path))
  assert text.count('not yet run here') == len(rows)


def test_a_recorded_run_fills_its_row(capsys, registry_path, tmp_path):
  _write_summary(tmp_path / 'run', 'imagenet_s_paper')
  assert tables.main(['record', str(tmp_path / 'run'), '--registry',
                      str(registry_path), '--note', 'test']) == 0
  assert 'recorded imagenet_s_paper: top-1 83.12%' in capsys.readouterr().out
  rows = _json(capsys, 'imagenet', '--registry', str(registry_path))
  recorded = [r for r in rows if r['ours'] is not None]
  assert [r['experiment'] for r in recorded] == ['imagenet_s_paper']
  assert recorded[0]['ours']['top1'] == 83.125
  assert recorded[0]['ours']['weights'] == 'ema'
  text = _run(capsys, 'imagenet', '--registry', str(registry_path))
  assert '83.12 (ema' in text
  assert text.count('not yet run here') == len(rows) - 1


def test_an_unfinished_run_is_not_recorded(capsys, registry_path, tmp_path):
  _write_summary(tmp_path / 'run', 'imagenet_s_paper', status='interrupted')
  assert tables.main(['record', str(tmp_path / 'run'), '--registry',
                      str(registry_path)]) == 1
  assert "not 'completed'" in capsys.readouterr().err
  assert registry.load(registry_path) == {}


def test_commands_run_the_rows_config(capsys, registry_path):
  imagenet = _json(capsys, 'imagenet', '--registry', str(registry_path))
  for row in imagenet:
    for step in row['steps']:
      file, arg = step['config'].split(':')
      config = load_config(Path(file).stem, arg)
      assert step['experiment'] == config.experiment
      assert f'--config={step["config"]} ' in step['command']
      assert f'--workdir=WORKDIR/{config.experiment}' in step['command']
  l21k = next(r for r in imagenet if (r['variant'], r['pretraining'],
                                      r['preset']) == ('l', '21k', 'paper'))
  assert (f'--config.init_from.path=WORKDIR/{l21k["steps"][0]["experiment"]}'
          in l21k['steps'][1]['command'])
  # Transfer starts from the ImageNet-1k row of the same variant and preset.
  transfer = _json(capsys, 'transfer', '--registry', str(registry_path))
  workdirs = {(r['variant'], r['preset']): r['experiment'] for r in imagenet
              if r['pretraining'] == '1k'}
  for row in transfer:
    assert (f'--config.init_from.path=WORKDIR/'
            f'{workdirs[row["variant"], row["preset"]]}'
            in row['steps'][0]['command'])


def test_transfer_paper_column_is_table_8(capsys, registry_path):
  rows = _json(capsys, 'transfer', '--registry', str(registry_path),
               '--preset', 'paper')
  assert len(rows) == 12  # S, M, L x CIFAR-10, CIFAR-100, Flowers, Cars
  cell = {(r['variant'], r['dataset']): (r['paper']['top1'],
                                         r['paper']['std']) for r in rows}
  assert cell['l', 'cifar100'] == (92.3, 0.13)
  assert cell['s', 'cars'] == (93.8, 0.11)


# --------------------------------------------------------------------------
# Every table prints as text and markdown.


@pytest.mark.parametrize('argv', [
    ['params', '--no-xla', '--variant', 'b0'],
    ['fused', '--no-throughput'],
    ['progressive', '--variant', 'l'],
    ['imagenet', '--preset', 'official'],
    ['transfer', '--preset', 'official'],
])
def test_every_table_prints_text_and_markdown(capsys, argv):
  text = _run(capsys, *argv)
  lines = text.splitlines()
  assert set(lines[1]) == {'-'} and len(lines) > 3
  markdown = _run(capsys, *argv, '--markdown').splitlines()
  assert markdown[0].startswith('| ') and markdown[1].startswith('|---')


def test_layout_keeps_a_pipe_inside_a_markdown_cell():
  from effnetv2_jax.tables import layout
  table = layout.Table([{'a': 'x | y'}], [layout.Column('a', lambda r: r['a'])])
  assert table.markdown().splitlines()[2] == '| x \\| y |'
