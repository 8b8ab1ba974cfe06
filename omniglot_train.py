"""
Meta-train MAML on Omniglot (N-way K-shot classification, Finn et al. 2017, section 5.2).

    python omniglot_train.py                                  # 5-way 1-shot, the seed's settings
    python omniglot_train.py --preset paper-5w1s              # the paper's protocol (maml/presets.py)
    python omniglot_train.py --preset paper-20w1s --device cuda
    python omniglot_train.py --resume checkpoints/last.pth    # continue a stopped run
    torchrun --standalone --nproc_per_node=4 omniglot_train.py --task_num 32   # 4 GPUs (maml/distributed.py)

Omniglot is downloaded into DATA_ROOT (or --data) when it is missing. Every --eval_every steps the
model is fine-tuned on --eval_tasks tasks of 100 held-out training characters (the same tasks each
time) and the accuracy after each fine-tuning step is printed as mean +- 95% CI; checkpoints go to
--save_dir (see maml/checkpoints.py). At the end the selected model, best.pth, is evaluated once on the
423 test characters. --val_classes 0 ranks the checkpoints on the test characters instead, as the
seed did (then the reported accuracy is the best of many looks at the test set).
"""
import copy
import os

import torch

from maml import distributed
from maml.devices import device_name
from maml.flags import make_parser, parse_args
from maml.trainer import EVAL_SEED, evaluate, fit, plain_dict, report_test, run_main, setup_device
from meta import Meta
from omniglotNShot import OmniglotNShot

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'omniglot')


def network(n_way, imgsz, filters=64, channels=1):
    """The paper's Omniglot net: 4 x [conv 3x3 stride 2, batch norm, ReLU], then a linear layer."""
    config, side = [], imgsz
    for i in range(4):
        config += [('conv2d', [filters, channels if i == 0 else filters, 3, 3, 2, 1]), ('bn', [filters]), ('relu', [])]
        side = (side + 1) // 2
    return config + [('flatten', []), ('linear', [n_way, filters * side * side])]


def make_loader(args, device, batchsz=None, seed=None):
    """The loader of a run's flags. With --split lake, validation and test tasks are drawn within
    one alphabet, and only training tasks are rotated: the benchmark tests characters as drawn."""
    lake = args.split == 'lake'
    return OmniglotNShot(args.data, batchsz=batchsz or args.task_num, n_way=args.n_way, k_shot=args.k_spt,
                         k_query=args.k_qry, imgsz=args.imgsz, device=device,
                         rotate=None if args.rotate == 'none' else args.rotate,
                         seed=args.seed if seed is None else seed, val_classes=args.val_classes,
                         preprocess=args.preprocess, split=args.split, val_alphabets=args.val_alphabets,
                         within_alphabet=('val', 'test') if lake else (), rotate_modes=('train',) if lake else None)


def fixed_tasks(db, mode, k_query, seed=EVAL_SEED):
    """next_batch() over the fixed sequence of `mode` tasks that `seed` gives (evaluate.py's too)."""
    db.reset(mode, seed)
    return lambda: db.next(mode, k_query=k_query)


def build_parser():
    """The common flags (flags.make_parser) and Omniglot's own."""
    parser = make_parser(__doc__.strip().splitlines()[0], 'omniglot', DATA_ROOT)
    parser.add_argument('--rotate', choices=['none', 'classes', 'per_task'],
                        help="rotation augmentation of training characters: 'per_task' gives each class of "
                             "a task a random multiple of 90 degrees (the official code, in every split; "
                             "with --split lake in training tasks only); 'classes' adds the rotated "
                             "characters as new classes")
    parser.add_argument('--val_classes', type=int,
                        help='training characters held out to rank checkpoints (the official code: 100); '
                             '0 ranks them on the test characters')
    parser.add_argument('--preprocess', choices=['official', 'greyscale'],
                        help="'official': binary 1-bit resize, ink 1 on background 0 (cbfinn/maml); "
                             "'greyscale': antialiased, background 1 (the seed)")
    parser.add_argument('--split', choices=['random', 'lake'],
                        help="'random': 1200 / 423 characters as in the paper; 'lake': train on the 30 "
                             "background alphabets, test (and validate) with tasks drawn within one alphabet "
                             "of the 20 evaluation (held-out background) alphabets")
    parser.add_argument('--val_alphabets', type=int,
                        help="with --split lake: whole background alphabets held out to rank checkpoints")
    return parser


def main():
    args = parse_args(build_parser(), 'omniglot')
    device = setup_device(args)

    with distributed.in_turn():
        db = make_loader(args, device, distributed.local_tasks(args.task_num), distributed.rank_seed(args.seed))
    eval_db = copy.copy(db)   # the same images and streams, drawn task_num at a time as by one process
    eval_db.batchsz = args.task_num
    maml = Meta(args, network(args.n_way, args.imgsz, args.num_filters), imgc=1).to(device)
    print(f'{device_name(device)}, torch {torch.__version__}\n{maml.net}\n{plain_dict(args)}')
    split = 'val' if 'val' in db.class_ids else 'test'
    if split == 'test':
        print('note: checkpoints are ranked on the TEST characters (no validation split), so best.pth\'s '
              'accuracy is optimistic; use --val_classes 100 for an unbiased report.')
    k_eval = args.k_qry_test or args.k_qry
    with fit(maml, db, lambda: db.next('train'),
             lambda: evaluate(maml, fixed_tasks(eval_db, split, k_eval), args.eval_tasks, f'{split} tasks'),
             args, split=split) as run:
        if split == 'val':
            report_test(run, lambda best: evaluate(Meta.from_state(best), fixed_tasks(eval_db, 'test', k_eval),
                                                   args.test_tasks, 'test tasks'), args.test_tasks, device)


if __name__ == '__main__':
    run_main(main)
