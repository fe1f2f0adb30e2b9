r"""ImageNet-21k pretraining (then fine-tune with configs/finetune_21k_to_1k.py).

Argument: `<variant>[,<preset>][,controller=feedback]`, variant in s, m, l,
xl (b0-b3 also accepted), preset 'paper' (default) or 'official';
`controller` 'linear' (default) or 'feedback' (README "Feedback controller";
100,000 more train images held out for its decisions).

    python -m effnetv2_jax.main --config=configs/imagenet21k.py:l,paper \
        --workdir=gs://BUCKET/effnetv2/l_21k \
        --config.data.data_dir=gs://BUCKET/imagenet21k_tfds

The dataset is ImageNet-21k (fall 2011, 21,843 classes in the official
code) prepared as a tfds directory; multi-hot labels are normalised to sum
to 1 before the softmax loss (paper Sec. 5.2), and 100,000 train images are
held out for evaluation.

  paper     the ImageNet-1k recipe (Table 6 progressive schedule, RMSProp,
            EMA, label smoothing 0.1) except 60 epochs with cosine decay.
  official  google/automl `ImageNet21k`: 60 epochs, learning rate 0.008 per
            256 (0.128 at 4096), 1 warmup epoch, cosine; fixed 224 px train
            and eval, no augmentation, no label smoothing, dropout 1e-6 and
            no stochastic depth; no progressive stages.

Expected result: pretraining itself has no published accuracy. After 21k ->
1k fine-tuning the paper reports top-1 S 84.9, M 86.2, L 86.8, XL 87.3
(Table 7; README: L 86.9, XL 87.2). Paper train time (21k, 32 TPUv3 cores):
XL about 45 h.
"""

from effnetv2_jax.training import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, variant='l', preset='paper',
                          controller='linear')
  c = recipes.base_config()
  recipes.apply_imagenet_recipe(c, args.variant, args.preset)
  c.experiment = f'imagenet21k_{args.variant}_{args.preset}'
  c.data.dataset = 'imagenet21k'
  c.train.epochs = 60.0
  c.train.normalize_labels = True
  c.schedule.kind = 'cosine'
  if args.preset == 'official':
    c.schedule.lr_per_256 = 0.008
    c.schedule.warmup_epochs = 1.0
    c.train.label_smoothing = 0.0
    c.data.augment = 'none'
    c.model.drop_path_rate = 0.0
    p = c.progressive
    p.num_stages = 1
    p.min_image_size = p.max_image_size = 224
    p.randaug_magnitude = (0.0, 0.0)
    p.mixup_alpha = p.cutmix_alpha = (0.0, 0.0)
    p.dropout_rate = (1e-6, 1e-6)
    c.eval.image_size = 224
  c.eval.every_steps = 10000
  c.checkpoint.every_steps = 2000
  recipes.apply_controller(c, args.controller, holdout=100_000)
  if args.controller != 'linear':
    c.experiment += f'_{args.controller}'
  return c
