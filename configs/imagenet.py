r"""ImageNet-1k from scratch: EfficientNetV2-S/M/L/XL and B0-B3, two recipes.

Argument: `<variant>[,<preset>][,controller=feedback]`, variant in s, m, l,
xl, b0, b1, b2, b3 and preset 'paper' (default) or 'official'; `controller`
'linear' (default, the paper's ramp) or 'feedback' (each stage's size and
regularisation set from the last stages' clean-train vs holdout accuracy,
README "Feedback controller"; 25,000 train images held out for it).

    # On a TPU slice (launch/tpu.py), ImageNet prepared with tfds:
    python -m effnetv2_jax.main --config=configs/imagenet.py:s,paper \
        --workdir=gs://BUCKET/effnetv2/s_paper \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
        --config.compilation_cache_dir=gs://BUCKET/jax_cache

Both presets: 350 epochs of 1,256,144 images (the official code's count of
its train split; tfds' train[:98%] holds 1,255,544) at batch 4096, TF1
RMSProp (decay 0.9, momentum 0.9, eps 1e-3), learning rate 0.016 per 256
images (0.256) with a 5-epoch linear warmup then x0.97 every 2.4 epochs, EMA
0.9999, label smoothing 0.1, L2 1e-5 on kernels, stochastic depth rate 0.2
(survival 1 - 0.2 i/N for block i of N: 0.805 at S's last block), 4
progressive stages of equal length, evaluation at the variant's eval size (S
384, M/L 480, XL 512; B0-B3 224/240/260/300) with raw and EMA weights, and
the official code's augmentation arithmetic (data.augment_semantics).

  paper     Table 6: image size linspace(128, max), RandAugment 5 -> max,
            mixup 0 -> max, dropout 0.1 -> max (S: 300, 15, 0, 0.3; M: 380,
            20, 0.2, 0.4; L: 380, 25, 0.4, 0.5; XL reuses L's column). B0-B3:
            one stage at the train size with AutoAugment (paper Table 11
            trained them without progressive learning).
  official  google/automl main.py: sizes int(128 + (train - 128)(k+1)/4)
            (S 171/214/257/300, M/L/XL 192/256/320/384), RandAugment
            linspace(5, max, 4) (max S 10, M 15, L/XL 20), mixup = CutMix =
            linspace(0, alpha, 4) (M 0.2, L/XL 0.5), dropout fixed (S 0.2,
            M 0.3, L/XL 0.4), BN moments over groups of 8 replicas.

Expected top-1 (paper Table 7 / official README; EMA weights): S 83.9, M
85.1 (README 85.2), L 85.7, B0 78.7, B1 79.8, B2 80.5, B3 82.1. XL has no
ImageNet-1k-only result (it was released for 21k pretraining). Reproductions
of the official code reached S 83.46 and M 84.46 (google/automl #1024).
Train time (paper): S 7.1 h, M 13 h, L 24 h on 32
TPUv3 cores.
"""

from effnetv2_jax.training import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, variant='s', preset='paper',
                          controller='linear')
  c = recipes.base_config()
  recipes.apply_imagenet_recipe(c, args.variant, args.preset)
  c.experiment = f'imagenet_{args.variant}_{args.preset}'
  c.data.dataset = 'imagenet2012'
  c.eval.every_steps = 5000
  c.checkpoint.every_steps = 1000
  # feedback: decisions on 25,000 train images held out (about 2%, the
  # size of minival, which stays the eval split).
  recipes.apply_controller(c, args.controller, holdout=25_000)
  if not c.data.holdout:
    # Epochs as the official code counts them (its declared train size).
    c.train.epoch_examples = recipes.IMAGENET_OFFICIAL_TRAIN_IMAGES
  if args.controller != 'linear':
    c.experiment += f'_{args.controller}'
  return c
