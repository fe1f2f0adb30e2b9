r"""Transfer ImageNet-1k weights to CIFAR-10, CIFAR-100, Flowers or Cars.

Argument: `<dataset>[,<variant>[,<preset>]]`, dataset in cifar10, cifar100,
flowers, cars; variant s (default), m, l; preset 'paper' (default) or
'official'.

    python -m effnetv2_jax.main --config=configs/transfer.py:cifar100,s \
        --workdir=/tmp/effnetv2_s_cifar100 \
        --config.init_from.path=/path/to/imagenet_s_workdir

Paper Sec. 5.3: 10,000 steps at batch 512, learning rate 0.001 with cosine
decay, weight decay disabled, simple cutout augmentation, from the
ImageNet-1k checkpoints (EMA weights; the head is re-initialised for the new
classes), training and evaluating at the variant's eval size (S 384, M/L
480). 'official' follows google/automl `Cifar10Ft` & co: constant rate
after a 1-epoch warmup and L2 1e-5; both use EMA 0.9996, label smoothing 0.1
and dropout 1e-6.

Expected top-1 (paper Table 8, mean of 5 runs):
            CIFAR-10  CIFAR-100  Flowers  Cars
  S         98.7      91.5       97.9     93.8
  M         99.0      92.2       98.5     94.6
  L         99.1      92.3       98.8     95.1
"""

from effnetv2_jax.training import recipes

DATASETS = {
    'cifar10': 'cifar10',
    'cifar100': 'cifar100',
    'flowers': 'oxford_flowers102',
    'cars': 'cars196',
}


def get_config(arg=None):
  args = recipes.parse_arg(arg, dataset='cifar10', variant='s',
                           preset='paper')
  if args.dataset not in DATASETS:
    raise ValueError(f'transfer dataset must be one of {sorted(DATASETS)}, '
                     f'got {args.dataset!r}')
  c = recipes.base_config()
  recipes.apply_finetune_recipe(c, args.variant, args.preset)
  c.experiment = f'transfer_{args.dataset}_{args.variant}_{args.preset}'
  c.data.dataset = DATASETS[args.dataset]
  c.train.total_steps = 10_000
  c.eval.batch_size = 512
  c.eval.every_steps = 2000
  c.checkpoint.every_steps = 1000
  return c
