"""
Every setting of every experiment, in one place: the defaults of the two training scripts (the
seed's) and the paper's experiments as the official code ran them (the commands of its README,
github.com/cbfinn/maml: 60,000 meta-iterations each).

    python omniglot_train.py --preset paper-5w1s         # Table 1, Omniglot 5-way 1-shot
    python miniimagenet_train.py --preset paper-5w5s --meta_lr 5e-4   # explicit flags still win
    python folder_train.py --data ~/my_images --preset paper-5w1s   # mini-ImageNet's, on your images

The official code's loss is the cross-entropy summed over a task's examples and divided by the
shot count K, i.e. n_way times the mean cross-entropy used here, so its inner learning rate
alpha becomes update_lr = alpha * n_way: 0.4 -> 2.0 (Omniglot 5-way), 0.1 -> 2.0 (20-way),
0.01 -> 0.05 (mini-ImageNet). It trains Omniglot with K query images per class, and mini-ImageNet
with 15 (K at test); each Omniglot class of a task gets a random rotation; checkpoints are chosen
on 100 held-out training characters (Omniglot) or on the validation classes (mini-ImageNet).

`maml++` is MAML++'s optimisation (Antoniou et al. 2019; family.MAMLPP: multi-step loss, learned
per-layer per-step inner rates, per-step batch-norm weights, cosine-annealed meta_lr, 5 inner
steps; without per-step running statistics, which its official code never evaluates with) on the tasks its paper reports: Omniglot 20-way 1-shot with meta-batch 8,
mini-ImageNet 5-way 1-shot with meta-batch 2 and 48 filters, 50,000 meta-steps each.
"""
from .family import MAMLPP, OPTIONS

# Meta's hyperparameters, with their defaults: the seed's Omniglot settings and the family's options
# off. A checkpoint stores them (with the network's input shape, imgc and imgsz) to rebuild its Meta.
HPARAMS = dict(update_lr=0.4, meta_lr=1e-3, update_step=5, update_step_test=10, first_order=False, grad_clip=0.0,
               amp=False, n_way=None, **OPTIONS)   # n_way None: the out features of the config's last layer

OMNIGLOT = dict(epoch=40000, n_way=5, k_spt=1, k_qry=15, k_qry_test=None, imgsz=28, task_num=32,
                meta_lr=1e-3, update_lr=0.4, update_step=5, update_step_test=10, num_filters=64,
                log_every=100, eval_every=500, eval_tasks=600, val_classes=100, rotate='none',
                preprocess='official', split='random', val_alphabets=0)

MINIIMAGENET = dict(epoch=60000, n_way=5, k_spt=1, k_qry=15, k_qry_test=None, imgsz=84, task_num=4,
                    meta_lr=1e-3, update_lr=0.01, update_step=5, update_step_test=10, num_filters=32,
                    log_every=30, eval_every=500, eval_tasks=600, pixel_norm='imagenet')

_OMNIGLOT_5WAY = dict(epoch=60000, n_way=5, task_num=32, meta_lr=1e-3, update_lr=2.0, update_step=1,
                      update_step_test=3, num_filters=64, imgsz=28, rotate='per_task', val_classes=100,
                      preprocess='official', split='random', val_alphabets=0)
_OMNIGLOT_20WAY = dict(_OMNIGLOT_5WAY, n_way=20, task_num=16, update_lr=2.0, update_step=5, update_step_test=5)
_MINI = dict(epoch=60000, n_way=5, k_qry=15, meta_lr=1e-3, update_lr=0.05, update_step=5,
             update_step_test=10, num_filters=32, imgsz=84, pixel_norm='unit')

PRESETS = {
    'omniglot': {
        'paper-5w1s': dict(_OMNIGLOT_5WAY, k_spt=1, k_qry=1, k_qry_test=1),
        'paper-5w5s': dict(_OMNIGLOT_5WAY, k_spt=5, k_qry=5, k_qry_test=5),
        'paper-20w1s': dict(_OMNIGLOT_20WAY, k_spt=1, k_qry=1, k_qry_test=1),
        'paper-20w5s': dict(_OMNIGLOT_20WAY, k_spt=5, k_qry=5, k_qry_test=5),
        'maml++': dict(_OMNIGLOT_20WAY, **MAMLPP, epoch=50000, task_num=8, k_spt=1, k_qry=1, k_qry_test=1),
        # Lake et al. 2015: train on the 30 background alphabets, test 20-way 1-shot within one of
        # the 20 evaluation alphabets (the paper's 20-way 1-shot recipe otherwise); the rotation
        # turns training tasks only (omniglot_train.make_loader): the benchmark tests characters as drawn
        'lake-20w1s': dict(_OMNIGLOT_20WAY, k_spt=1, k_qry=1, k_qry_test=1, split='lake', val_classes=0,
                           val_alphabets=5),
    },
    'miniimagenet': {
        'paper-5w1s': dict(_MINI, task_num=4, k_spt=1, k_qry_test=1),
        'paper-5w5s': dict(_MINI, task_num=2, k_spt=5, k_qry_test=5),
        'maml++': dict(_MINI, **{**MAMLPP, 'update_lr': 0.01}, epoch=50000, task_num=2, k_spt=1, k_qry_test=1,
                       num_filters=48),
    },
}
# folder_train.py (your own images): a preset is mini-ImageNet's, but for the image size and pixels,
# which come from the images
PRESETS['folder'] = {name: {k: v for k, v in preset.items() if k not in ('imgsz', 'pixel_norm')}
                     for name, preset in PRESETS['miniimagenet'].items()}

# Its defaults are those of the data set the images resemble (PROFILES): of mini-ImageNet for
# photographs, of Omniglot for line drawings (every image 1-bit). The flags the two share are
# set here; None is decided from the images.
PROFILE_FLAGS = ('epoch', 'imgsz', 'task_num', 'update_lr', 'num_filters', 'log_every')
PROFILES = {'photos': dict({k: MINIIMAGENET[k] for k in PROFILE_FLAGS}, network='miniimagenet'),
            'drawings': dict({k: OMNIGLOT[k] for k in PROFILE_FLAGS}, network='omniglot')}
FOLDER = dict({k: v for k, v in MINIIMAGENET.items() if k in OMNIGLOT and OMNIGLOT[k] == v},
              **dict.fromkeys(PROFILE_FLAGS), network=None, channels='auto', preprocess='bilinear',
              split_fractions=[64, 16, 20], split_seed=0)

DEFAULTS = {'omniglot': OMNIGLOT, 'miniimagenet': MINIIMAGENET, 'folder': FOLDER}
