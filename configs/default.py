"""Every config key with its default; the other configs import this and change a few fields.

Keys (all overridable as --config.KEY=VALUE; an unknown key is an error):
  data_dir, data_source, tfds_dir, seed, image_size (H, W), batch_size (global), grad_accum_steps,
  num_train_steps (optimiser updates), coarse_steps, coarse_image_size, val_fraction, val_cars, learning_rate, warmup_steps, optimizer,
  weight_decay, grad_clip_norm, checkpoint_every, eval_every, keep_checkpoints, log_every,
  num_workers, skip_bad_files, loss, loss_boundary_*, soft_masks, ema_decay, pseudo_*, tta, postprocess, fit,
  threshold, num_plot_images, tensorboard, profile_steps, model.*, augment.*.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data_dir = "data/kaggle"        # the Kaggle download (zips or unzipped)
    c.data_source = "folder"          # 'folder' reads the Kaggle layout; 'tfds' the dataset `prepare` built
    c.tfds_dir = ""                   # where `python -m carvana_jax.data.prepare` built it ('' = DATA_DIR/tfds)
    c.seed = 0
    c.image_size = (768, 768)         # (H, W) the model sees; the photo is warped to it
    c.batch_size = 4                  # global batch over all devices and processes, per micro-step
    c.grad_accum_steps = 1            # micro-steps per optimiser update (optax.MultiSteps)
    c.num_train_steps = 20_000        # optimiser updates (not micro-steps)
    c.coarse_steps = 0                # the first this many updates train at coarse_image_size (progressive
                                      # resizing: cheap early updates learn the shapes); 0 = off
    c.coarse_image_size = ()          # (H, W) of those updates, ≤ image_size; the boundary band scales with it
    c.val_fraction = 0.0              # share of CARS held out; 0 trains on everything, as the seed did
    c.val_cars = ()                   # car ids to hold out instead (needs val_fraction=0; cv's folds set it)
    c.learning_rate = 1e-3
    c.warmup_steps = 500              # updates of linear warm-up before the cosine decay
    c.optimizer = "adam"              # 'adam' | 'adamw' | 'rmsprop'
    c.weight_decay = 1e-4             # used by adamw only
    c.grad_clip_norm = 1.0            # global-norm clipping; 0 disables it
    c.loss = "bce_dice"               # 'bce' | 'dice' | 'bce_dice' | 'bce_jaccard' | 'bce_logdice'
    c.loss_boundary_weight = 0.0      # extra per-pixel weight near the true edge (0 = none): pixel weight 1 + this
    c.loss_boundary_width = 2         # model pixels from the true edge that count as "near" it
    c.soft_masks = False              # train on each pixel's car coverage (0..1) instead of a 0/1 mask
    c.ema_decay = 0.0                 # exponential moving average of the parameters (0 = off), used for validation
    c.pseudo_labels = ""              # a submission CSV (img,rle_mask) of test photos whose masks are added to
                                      # training; the photos come from DATA_DIR/test (or the TFDS test split)
    c.pseudo_fraction = 0.0           # share of each global training batch drawn from the pseudo-labelled
                                      # photos, in [0, 1), rounded half up to whole photos
    c.tta = "none"                    # eval's default test-time augmentation (eval --tta overrides it)
    c.postprocess = "none"            # eval's default mask clean-up (eval --postprocess overrides it)
    c.fit = "resize"                  # 'resize' the photo to image_size | 'pad' it (reflect) and crop back
    c.threshold = 0.5                 # probability above which a pixel is car
    c.checkpoint_every = 1000         # optimiser updates between checkpoints
    c.eval_every = 1000               # optimiser updates between validation passes
    c.keep_checkpoints = 3            # latest checkpoints kept (the best by val Dice is kept too)
    c.log_every = 20                  # optimiser updates between metrics.jsonl lines
    c.num_workers = 2                 # grain worker processes decoding and augmenting; 0 = in-process
    c.prefetch_batches = 2            # batches placed on the devices ahead of the step using them
    c.skip_bad_files = False          # skip (and count) unreadable images instead of failing
    c.num_plot_images = 4             # validation images drawn in plots/overlays.png
    c.tensorboard = True              # TensorBoard event files in WORKDIR/tensorboard (no TensorFlow needed)
    c.profile_steps = ""              # 'START:STOP': a jax.profiler trace of updates START+1..STOP in WORKDIR/profile
    c.eval_batch_size = 8

    c.model = ml_collections.ConfigDict()
    c.model.features = 32             # width of the first block; doubles per level
    c.model.depth = 4                 # down blocks (the seed: 4 down, 1 centre, 4 up = 18 convs)
    c.model.widths = ()               # the blocks' widths per level 0..depth (centre last); () = features doubling
    c.model.norm = "batch"            # 'batch' (synchronised over devices) | 'none'
    c.model.block = "double_conv"     # 'double_conv' | 'dense'
    c.model.dense_layers = 4          # conv layers per block when block='dense'
    c.model.dtype = "float32"         # compute dtype: 'float32' | 'bfloat16' (params stay float32)
    c.model.space_to_depth = 1        # s > 1: the blocks run at H/s × W/s on s×s patches folded into channels,
                                      # the head unfolds s×s logits per patch (nearly the compute of H/s × W/s)
    c.model.remat = False             # recompute each block's activations in the backward pass (less memory)
    c.model.encoder = "unet"          # 'unet' (plain blocks) | 'vgg11' (TernausNet) | 'resnet34'
    c.model.pretrained = ""           # a torchvision ImageNet state dict (.pth/.safetensors) for the encoder

    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True
    c.augment.zoom = 0.1              # scale drawn from [1-zoom, 1+zoom]
    c.augment.shear = 0.05            # shear angle in radians, ±
    c.augment.rotation = 5.0          # degrees, ±
    c.augment.shift = 0.0625          # fraction of width/height, ±
    c.augment.hflip = 0.5             # probability of a horizontal flip
    c.augment.brightness = 0.1        # image only: ±10% brightness
    c.augment.contrast = 0.1          # image only: ±10% contrast
    c.augment.saturation = 0.1        # image only: ±10% saturation
    c.augment.hue = 0.0               # image only: hue rotated by up to ± this many degrees
    c.augment.greyscale = 0.0         # image only: probability of a greyscale copy
    c.augment.channel_shuffle = 0.0   # image only: probability of permuting the RGB channels
    return c
