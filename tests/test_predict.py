"""predict: TF-exact eval preprocessing without TF, the CLI and its errors."""

import importlib.util
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from effnetv2_jax import predict
from effnetv2_jax.imagenet_classes import IMAGENET_CLASSES
from effnetv2_jax.models import arch, weights
from model_variables import random_variables

TINY = arch.scaled(arch.get_architecture('b0'), width=0.25, depth=0.25,
                   head_channels=32, name='tiny')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tf():
  """TensorFlow, the reference (a core dependency; predict never imports it)."""
  import tensorflow
  return tensorflow


def random_image(h, w, seed):
  rng = np.random.default_rng(seed)
  # Smooth structure plus noise: exercises interpolation, not just noise.
  yy, xx = np.mgrid[0:h, 0:w]
  base = 127 + 100 * np.sin(yy / 5.0)[..., None] * np.cos(xx / 7.0)[..., None]
  return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Resizing and preprocessing against TensorFlow.

SHAPES = [(47, 17, 224), (375, 500, 384), (500, 333, 260), (17, 41, 32),
          (64, 64, 64), (5, 3, 7), (300, 301, 299)]


@pytest.mark.parametrize('h, w, size', SHAPES)
def test_bilinear_matches_tf_resize(tf, h, w, size):
  image = random_image(h, w, size)
  ours = predict.resize_bilinear(image, size, size)
  theirs = tf.image.resize(image, [size, size], method='bilinear',
                           antialias=False).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize('h, w, size', SHAPES)
def test_legacy_bicubic_matches_tf1_resize_bicubic(tf, h, w, size):
  image = random_image(h, w, size + 1)
  ours = predict.resize_bicubic_legacy(image, size, size)
  theirs = tf.raw_ops.ResizeBicubic(
      images=image[None], size=[size, size], align_corners=False,
      half_pixel_centers=False)[0].numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


def _official_tf(tf, image, size, normalization):
  """The official eval preprocessing, written with TF ops (automl code)."""
  h, w = image.shape[:2]
  crop = int(tf.cast(size / (size + 32) * tf.cast(min(h, w), tf.float32),
                     tf.int32))
  if normalization == 'imagenet':
    y, x = ((h - crop) + 1) // 2, ((w - crop) + 1) // 2
    image = tf.image.crop_to_bounding_box(image, y, x, crop, crop)
    image = tf.raw_ops.ResizeBicubic(images=image[None], size=[size, size],
                                     align_corners=False,
                                     half_pixel_centers=False)[0]
    mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32) * 255
    return ((image - mean) / std).numpy()
  if normalization == 'inception' and size < 320:
    image = tf.image.crop_to_bounding_box(image, (h - crop) // 2,
                                          (w - crop) // 2, crop, crop)
  image = tf.image.resize(image, [size, size])
  if normalization == 'inception':
    return ((image - 128.0) / 128.0).numpy()
  return ((image / 255.0 - 0.5) / 0.5).numpy()


@pytest.mark.parametrize('normalization, size', [
    ('inception', 224), ('inception', 300), ('inception', 384),
    ('imagenet', 240), ('ft', 128)])
def test_preprocess_matches_official_tf_code(tf, normalization, size):
  for h, w in ((375, 500), (481, 319)):
    image = random_image(h, w, h)
    ours = predict.preprocess(image, size, normalization)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    theirs = _official_tf(tf, image, size, normalization)
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)


@pytest.mark.parametrize('normalization, size', [
    ('inception', 224), ('inception', 384), ('imagenet', 260), ('ft', 96)])
def test_preprocess_matches_our_tf_eval_pipeline(tf, normalization, size):
  """predict and the training-time evaluation see the same tensors."""
  from effnetv2_jax.data import preprocess as data_preprocess
  image = random_image(333, 250, size)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, 'PNG')  # lossless: same decoded pixels
  theirs = data_preprocess.eval_image(
      tf.constant(buffer.getvalue()), record_kind='encoded', image_size=size,
      normalization=normalization).numpy()
  ours = predict.preprocess(image, size, normalization)
  np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)


def test_jpeg_decoding_is_tf_accurate_idct(tf, tmp_path):
  """PIL decodes JPEG like TF's INTEGER_ACCURATE IDCT (TF's default is the
  fast IDCT, a few levels off on some pixels; see predict's docstring)."""
  buffer = io.BytesIO()
  Image.fromarray(random_image(61, 83, 3)).save(buffer, 'JPEG', quality=90)
  data = buffer.getvalue()
  path = tmp_path / 'image.jpg'
  path.write_bytes(data)
  ours = predict.read_image(str(path))
  accurate = tf.io.decode_jpeg(data, channels=3,
                               dct_method='INTEGER_ACCURATE').numpy()
  np.testing.assert_array_equal(ours, accurate)


def test_small_and_odd_images_survive_the_crop():
  for h, w in ((1, 1), (2, 9), (47, 17)):
    for normalization in predict.NORMALIZATIONS:
      out = predict.preprocess(random_image(h, w, 0), 224, normalization)
      assert out.shape == (224, 224, 3) and np.isfinite(out).all()


# ----------------------------------------------------------------------------
# Class names.


def test_class_names_follow_the_imagenet_label_order():
  """Checked against timm's bundled synset list and WordNet lemmas."""
  assert len(IMAGENET_CLASSES) == 1000
  spec = importlib.util.find_spec('timm')
  if spec is None:
    pytest.skip('timm not installed')
  info = os.path.join(spec.submodule_search_locations[0], 'data', '_info')
  with open(os.path.join(info, 'imagenet_synsets.txt')) as f:
    synsets = f.read().split()
  with open(os.path.join(info, 'imagenet_synset_to_lemma.txt')) as f:
    lemmas = dict(line.split('\t', 1) for line in f.read().splitlines())
  mismatched = [i for i, name in enumerate(IMAGENET_CLASSES)
                if name.lower() not in lemmas[synsets[i]].lower()]
  # Two names are disambiguated: 'crane bird' (134), 'maillot tank suit' (639).
  assert mismatched == [134, 639]


# ----------------------------------------------------------------------------
# The command line.


def jitted_logits(model, x):
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(
      lambda s, x: nnx.merge(graphdef, s)(x, training=False))(state, x))


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  params, stats = random_variables(TINY, 1000, 0, stats_high=1.0)
  model = weights.model_from_variables(TINY, 1000, params, stats,
                                       conv_impl='xla')
  directory = tmp_path_factory.mktemp('predict') / 'tiny'
  weights.save_model(directory, model, normalization='inception')
  return str(directory), model


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('inputs')
  paths = []
  for i, (h, w) in enumerate(((90, 120), (77, 51))):
    path = str(root / f'img{i}.png')
    Image.fromarray(random_image(h, w, i)).save(path)
    paths.append(path)
  corrupt = str(root / 'corrupt.jpg')
  with open(corrupt, 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 this is not a JPEG')
  batch = str(root / 'batch.npy')
  np.save(batch, np.random.default_rng(2).normal(
      size=(3, 40, 40, 3)).astype(np.float32))
  bad_npy = str(root / 'bad.npy')
  np.save(bad_npy, np.zeros((4, 4), np.int32))
  return dict(images=paths, corrupt=corrupt, batch=batch, bad_npy=bad_npy,
              root=root)


def test_cli_prints_top5_and_saves_logits(model_dir, inputs, capsys):
  directory, model = model_dir
  logits_file = str(inputs['root'] / 'logits.npy')
  args = inputs['images'] + [inputs['corrupt'], inputs['batch'],
                             inputs['bad_npy']]
  status = predict.main(['--checkpoint', directory, '--image-size', '64',
                         '--save-logits', logits_file] + args)
  out, err = capsys.readouterr()
  assert status == 1  # some inputs were skipped
  # Unreadable inputs are named on stderr, one line each, and skipped.
  skipped = [line for line in err.splitlines() if line.startswith('skipping')]
  assert len(skipped) == 2
  assert inputs['corrupt'] in skipped[0] and 'unreadable image' in skipped[0]
  assert inputs['bad_npy'] in skipped[1] and 'NHWC' in skipped[1]
  assert 'Traceback' not in err
  logits = np.load(logits_file)
  assert logits.shape == (5, 1000)
  # Images: the official preprocessing (inception, 64 < 320: centre crop).
  images = np.stack([
      predict.preprocess(predict.read_image(p), 64, 'inception')
      for p in inputs['images']])
  np.testing.assert_allclose(logits[:2], jitted_logits(model, images),
                             rtol=1e-5, atol=1e-5)
  # .npy: taken as is.
  batch = np.load(inputs['batch'])
  np.testing.assert_allclose(logits[2:], jitted_logits(model, batch),
                             rtol=1e-5, atol=1e-5)
  # Top-5 per input, with ImageNet names, in probability order.
  lines = out.splitlines()
  labels = inputs['images'] + [f'{inputs["batch"]}[{i}]' for i in range(3)]
  for k, label in enumerate(labels):
    at = lines.index(label)
    ranked = lines[at + 1:at + 6]
    best = np.argsort(-logits[k])[:5]
    for rank, (line, index) in enumerate(zip(ranked, best), 1):
      assert line.strip().startswith(f'{rank}.')
      assert line.endswith(f'{IMAGENET_CLASSES[index]} ({index})')


def test_cli_all_readable_exits_zero(model_dir, inputs, capsys):
  directory, _ = model_dir
  status = predict.main(['--checkpoint', directory, '--image-size', '64',
                         '--top-k', '2'] + inputs['images'])
  out, _ = capsys.readouterr()
  assert status == 0
  assert out.count('  1. ') == 2 and '  3. ' not in out


def test_cli_defaults_to_the_eval_size_and_normalization(model_dir, inputs,
                                                         capsys):
  directory, _ = model_dir
  assert predict.main(['--checkpoint', directory, inputs['images'][0]]) == 0
  _, err = capsys.readouterr()
  # TINY keeps B0's eval size (224); model.json says inception.
  assert 'centre crop 224/256, bilinear to 224, (x - 128) / 128' in err


def test_cli_variant_that_disagrees_with_model_json(model_dir, inputs,
                                                    capsys):
  directory, _ = model_dir
  status = predict.main(['--checkpoint', directory, '--variant', 's']
                        + inputs['images'])
  _, err = capsys.readouterr()
  assert status == 1
  assert err.count('\n') == 1 and 'model.json' in err and "'s'" in err


def test_cli_missing_or_foreign_checkpoint(inputs, tmp_path, capsys):
  assert predict.main(['--checkpoint', str(tmp_path / 'none')]
                      + inputs['images']) == 1
  _, err = capsys.readouterr()
  assert err.count('\n') == 1 and 'model directory' in err
  assert predict.main(['--checkpoint', str(tmp_path), '--variant', 'b0']
                      + inputs['images']) == 1
  _, err = capsys.readouterr()
  assert err.count('\n') == 1 and 'no model.json' in err


def test_cli_bad_arguments(model_dir, inputs, capsys):
  directory, _ = model_dir
  assert predict.main(['--checkpoint', directory, '--variant', 'b9']
                      + inputs['images']) == 2
  assert predict.main(['--checkpoint', directory, '--save-logits', 'x.txt']
                      + inputs['images']) == 2
  _, err = capsys.readouterr()
  assert 'unknown EfficientNetV2 variant' in err and '.npy' in err


def test_cli_names_classes_by_index_without_1000_classes(inputs, tmp_path,
                                                         capsys):
  params, stats = random_variables(TINY, 7, 1, stats_high=1.0)
  model = weights.model_from_variables(TINY, 7, params, stats,
                                       conv_impl='xla')
  weights.save_model(tmp_path / 'm7', model)
  assert predict.main(['--checkpoint', str(tmp_path / 'm7'), '--image-size',
                       '48', inputs['images'][0]]) == 0
  out, _ = capsys.readouterr()
  assert '  1. ' in out and 'class ' in out and 'tench' not in out


def test_cli_reads_a_training_workdir_preferring_ema(inputs, tmp_path,
                                                     capsys):
  import orbax.checkpoint as ocp
  b0 = arch.get_architecture('b0')
  ema_params, ema_stats = random_variables(b0, 1000, 4, stats_high=1.0)
  # The raw weights differ from the EMA ones by a classifier bias offset, so
  # raw logits would be the EMA logits + 10: one forward tells them apart.
  raw_params = jax.tree.map(np.copy, ema_params)
  raw_params['head']['classifier']['bias'] += 10.0
  state = dict(step=np.int32(7), params=raw_params, batch_stats=ema_stats,
               ema_params=ema_params, ema_batch_stats=ema_stats)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / 'checkpoints' / '7' / 'state'), state)
  checkpointer.wait_until_finished()
  logits_file = str(tmp_path / 'l.npy')
  status = predict.main(['--checkpoint', str(tmp_path), '--variant', 'b0',
                         '--save-logits', logits_file, inputs['batch']])
  assert status == 0, capsys.readouterr().err
  ema = jitted_logits(weights.model_from_variables(
      b0, 1000, ema_params, ema_stats, conv_impl='xla'),
      np.load(inputs['batch']))
  # predict runs the CPU's 'shifted' depthwise kernels: rounding differs.
  np.testing.assert_allclose(np.load(logits_file), ema, rtol=0,
                             atol=1e-5 * np.abs(ema).max())
  assert predict.main(['--checkpoint', str(tmp_path)] + inputs['images']) == 1
  assert 'pass --variant' in capsys.readouterr().err


def test_module_entry_point_runs_without_tensorflow(model_dir, inputs):
  """`python -m effnetv2_jax.predict`: one-line errors, no tensorflow."""
  directory, _ = model_dir
  argv = ['effnetv2_jax.predict', '--checkpoint', directory, '--image-size',
          '40', inputs['images'][0], inputs['corrupt']]
  code = ('import runpy, sys\n'
          f'sys.argv = {argv!r}\n'
          'try:\n'
          '  runpy.run_module("effnetv2_jax.predict", run_name="__main__")\n'
          'except SystemExit as e:\n'
          '  assert "tensorflow" not in sys.modules, "tensorflow imported"\n'
          '  sys.exit(e.code)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]  # one input skipped
  assert 'Traceback' not in result.stderr
  assert inputs['images'][0] in result.stdout
  assert f'skipping {inputs["corrupt"]}: unreadable image' in result.stderr
