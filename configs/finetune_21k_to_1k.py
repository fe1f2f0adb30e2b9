r"""Fine-tune ImageNet-21k weights on ImageNet-1k.

Argument: `<variant>[,<preset>]`, variant in s, m, l, xl (b0-b3 also
accepted), preset 'paper' (default) or 'official'.

    python -m effnetv2_jax.main --config=configs/finetune_21k_to_1k.py:l \
        --workdir=gs://BUCKET/effnetv2/l_21k_ft1k \
        --config.init_from.path=gs://BUCKET/effnetv2/l_21k \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

`init_from.path` is a 21k training workdir (its latest checkpoint), an
orbax directory or an .npz of converted weights; the EMA weights are used
and the 21,843-way classifier is re-initialised for 1,000 classes (the run
prints what was and was not loaded).

15 epochs at batch 512 and the eval size (S 384, M/L 480, XL 512), learning
rate 0.001 after one warmup epoch, 'ft' augmentation, EMA 0.9996, no
progressive stages. 'paper' decays the rate with a cosine and turns weight
decay off; 'official' (google/automl `ImagenetFt`) keeps it constant with
L2 1e-5.

Expected top-1 (paper Table 7): S 84.9, M 86.2, L 86.8, XL 87.3 (README:
S 84.9, M 86.2, L 86.9, XL 87.2).
"""

from effnetv2_jax.training import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, variant='l', preset='paper')
  c = recipes.base_config()
  recipes.apply_finetune_recipe(c, args.variant, args.preset)
  c.experiment = f'finetune_21k_to_1k_{args.variant}_{args.preset}'
  c.data.dataset = 'imagenet2012'
  c.model.num_classes = 1000
  c.train.epochs = 15.0
  # Epochs as the official code counts them (its declared train size).
  c.train.epoch_examples = recipes.IMAGENET_OFFICIAL_TRAIN_IMAGES
  c.eval.every_steps = 5000
  c.checkpoint.every_steps = 1000
  return c
