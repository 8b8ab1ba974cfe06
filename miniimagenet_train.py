"""
Meta-train MAML on mini-ImageNet (N-way K-shot classification, Finn et al. 2017, section 5.2).

    python miniimagenet_train.py                              # 5-way 1-shot, the seed's settings
    python miniimagenet_train.py --preset paper-5w1s          # the paper's protocol (maml/presets.py)
    python miniimagenet_train.py --preset paper-5w5s
    python miniimagenet_train.py --resume checkpoints/last.pth
    torchrun --standalone --nproc_per_node=4 miniimagenet_train.py --task_num 32   # 4 GPUs (maml/distributed.py)

DATA_ROOT (or --data) holds images/*.jpg and train.csv, val.csv, test.csv (see README). Each split
is decoded once into a uint8 cache under <data>/cache and episodes are gathered on the device.
Checkpoints are ranked by accuracy on --eval_tasks validation tasks; the test split is touched
only at the end, to report the selected model (best.pth) over --test_tasks tasks.
"""
import os

import torch

from maml import distributed
from maml.devices import device_name
from maml.flags import make_parser, parse_args
from maml.trainer import EVAL_SEED, evaluate, fit, plain_dict, report_test, run_main, setup_device
from meta import Meta
from MiniImagenet import MiniImagenetCache, check_splits

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'miniimagenet')
EVAL_BATCH = 8   # tasks fine-tuned at once when evaluating (no meta-gradient, so more fit)


def network(n_way, imgsz, filters=32, channels=3):
    """The paper's MiniImagenet net: 4 x [conv 3x3 pad 1, batch norm, ReLU, max-pool 2], then linear."""
    config, side = [], imgsz
    for i in range(4):
        config += [('conv2d', [filters, channels if i == 0 else filters, 3, 3, 1, 1]), ('bn', [filters]),
                   ('relu', []), ('max_pool2d', [2, 2, 0])]
        side //= 2
    return config + [('flatten', []), ('linear', [n_way, filters * side * side])]


def fixed_tasks(split, n_way, k_shot, k_query, seed=EVAL_SEED):
    """next_batch() over the fixed sequence of tasks of `split` (a TaskSampler: mini-ImageNet's or a
    folder's) that `seed` gives (evaluate.py's too)."""
    split.reset(seed)
    return lambda: split.sample(EVAL_BATCH, n_way, k_shot, k_query)


def build_parser():
    """The common flags (flags.make_parser) and mini-ImageNet's own."""
    parser = make_parser(__doc__.strip().splitlines()[0], 'miniimagenet', DATA_ROOT)
    parser.add_argument('--pixel_norm', choices=['imagenet', 'unit'],
                        help="pixel normalisation: 'imagenet' mean/std (the seed) or 'unit', x / 255 only "
                             "(the official code)")
    return parser


def main():
    args = parse_args(build_parser(), 'miniimagenet')
    device = setup_device(args)

    check_splits(args.data, split_tasks(args))
    with distributed.in_turn():
        splits = {mode: MiniImagenetCache(args.data, mode, resize=args.imgsz, device=device,
                                          seed=distributed.rank_seed(args.seed),
                                          pixel_norm=args.pixel_norm) for mode in ('train', 'val', 'test')}
    maml = Meta(args, network(args.n_way, args.imgsz, args.num_filters), imgc=3).to(device)
    meta_train(maml, splits, args, device)


def split_tasks(args):
    """The task shape (n_way, k_shot, k_query) that each split must give."""
    k_eval = args.k_qry_test or args.k_qry
    return {'train': (args.n_way, args.k_spt, args.k_qry), 'val': (args.n_way, args.k_spt, k_eval),
            'test': (args.n_way, args.k_spt, k_eval)}


def meta_train(maml, splits, args, device, data=None):
    """Meta-train on splits['train'], rank the checkpoints on splits['val'], report the selected one
    on splits['test'] (TaskSamplers: mini-ImageNet's, or a folder's, with `data` to store)."""
    print(f'{device_name(device)}, torch {torch.__version__}\n{maml.net}\n{plain_dict(args)}')
    k_eval = args.k_qry_test or args.k_qry
    train, shard = splits['train'], distributed.local_tasks(args.task_num)   # this rank's tasks per step
    shape = (args.n_way, args.k_spt, k_eval)
    run = fit(maml, train, lambda: train.sample(shard, args.n_way, args.k_spt, args.k_qry),
              lambda: evaluate(maml, fixed_tasks(splits['val'], *shape), args.eval_tasks, 'val tasks'),
              args, split='val', data=data)
    report_test(run, lambda best: evaluate(Meta.from_state(best), fixed_tasks(splits['test'], *shape), args.test_tasks,
                                           'test tasks'), args.test_tasks, device)


if __name__ == '__main__':
    run_main(main)
