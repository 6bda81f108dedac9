"""The best model two CPU cores train from scratch in 30 minutes on the 64 real Kaggle cars.

    ./run.sh configs/real_cpu.py --config.data_dir=PATH/TO/carvana_real64

Every choice here was measured on real held-out cars (BENCHMARKS.md, "Real cars"): the photo and its mask at 256×384
folded into 2×2 patches (model.space_to_depth=2), so the demo's width-8 U-Net runs at 128×192 while it sees twice
the detail and predicts a mask twice as fine; soft-coverage masks (a perfect 0/1 mask at 128×192 scores only 0.993);
boundary weighting of the loss (weight 2: 5 tied on seven K-fold folds); a moving average of the parameters;
the h-flip at test time, and a guided filter that snaps the predicted edge to the photo's (postprocess='guided':
carvana_jax.refine), and the input moved by one pixel (tta 'phase': the fold's other patch phase). Width 16 is 3.5×
slower a step on this CPU: too few updates in 30 minutes; the three deepest levels run at 32×48, 16×24 and 8×12,
where 48, 96 and 192 channels instead of 32, 64 and 128 cost little time, so they are wider. 10 of the 64 cars are
held out so the run reports its own Dice on cars it never saw; --config.val_fraction=0 trains on all of them.
"""
from configs import demo


def get_config():
    config = demo.get_config()
    config.data_dir = "data/carvana_real64"
    config.image_size = (256, 384)    # the blocks run at 128×192, the demo's size
    config.model.space_to_depth = 2
    config.model.widths = (8, 16, 48, 96, 192)  # the deep levels wider: 2.2× the parameters, ≈ the same step time
    config.val_fraction = 0.16        # 10 of 64 cars
    config.soft_masks = True
    config.loss_boundary_weight = 2.0
    config.loss_boundary_width = 4    # pixels at 256×384: the 2 of the demo's 128×192
    config.batch_size = 4             # twice the updates of batch 8 for the same photos: +0.0003 on real cars
    config.num_train_steps = 5400
    config.warmup_steps = 200
    config.checkpoint_every = 1350
    config.eval_every = 2700
    config.log_every = 20
    config.ema_decay = 0.99
    config.tta = "hflip,phase"      # 4 views: both orientations at both phases of the 2×2 fold
    config.postprocess = "guided"     # eval's default: the edge refined by the photo at its 1/4 decode
    return config
