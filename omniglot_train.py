"""
Meta-train MAML on Omniglot (N-way K-shot classification, Finn et al. 2017, section 5.2).

    python omniglot_train.py                                  # 5-way 1-shot, the seed's defaults
    python omniglot_train.py --n_way 20 --k_spt 1 --task_num 16 --update_lr 0.1 --rotate
    python omniglot_train.py --resume checkpoints/last.pth    # continue a stopped run

Omniglot is downloaded into DATA_ROOT (or --data) when it is missing. Every --eval_every steps the
model is fine-tuned on --eval_tasks test tasks (the same tasks each time) and the accuracy after each
fine-tuning step is printed as mean +- 95% CI; checkpoints go to --save_dir (see trainer.py). With
--val_classes 100 the checkpoints are ranked on 100 held-out training characters instead, and the
test characters are used once, at the end, to report best.pth.
"""
import os

from meta import Meta
from omniglotNShot import OmniglotNShot
from trainer import check_args, common_args, describe, evaluate, fit, report_test, run_main, setup_device

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'omniglot')
EVAL_SEED = 12345   # the test tasks of every evaluation, so that checkpoints compare on equal terms


def network(n_way, imgsz, filters=64):
    """The paper's Omniglot net: 4 x [conv 3x3 stride 2, batch norm, ReLU], then a linear layer."""
    config, side = [], imgsz
    for i in range(4):
        config += [('conv2d', [filters, 1 if i == 0 else filters, 3, 3, 2, 1]), ('bn', [filters]), ('relu', [])]
        side = (side + 1) // 2
    return config + [('flatten', []), ('linear', [n_way, filters * side * side])]


def main():
    parser = common_args(__doc__.strip().splitlines()[0], epoch=40000, n_way=5, k_spt=1, k_qry=15, imgsz=28,
                         imgc=1, task_num=32, meta_lr=1e-3, update_lr=0.4, update_step=5,
                         update_step_test=10, num_filters=64, data=DATA_ROOT, log_every=100)
    parser.add_argument('--rotate', action='store_true',
                        help='add each training character rotated by 90/180/270 degrees as new classes')
    parser.add_argument('--val_classes', type=int, default=0,
                        help='training characters held out to rank checkpoints (the official code: 100); '
                             'with 0 they are ranked on the test characters, as in the paper and the seed')
    args = parser.parse_args()
    check_args(args)
    device = setup_device(args)

    db = OmniglotNShot(args.data, batchsz=args.task_num, n_way=args.n_way, k_shot=args.k_spt,
                       k_query=args.k_qry, imgsz=args.imgsz, device=device, rotate=args.rotate, seed=args.seed,
                       val_classes=args.val_classes)
    maml = Meta(args, network(args.n_way, args.imgsz, args.num_filters)).to(device)
    print(f'{describe(device)}\n{maml.net}\n{vars(args)}')

    def tasks(mode, n_tasks, net=maml):
        db.reset(mode, EVAL_SEED)
        return evaluate(net, lambda: db.next(mode), n_tasks)

    split = 'val' if args.val_classes else 'test'
    ckpts = fit(maml, db, lambda: db.next('train'), lambda: tasks(split, args.eval_tasks), args, split=split)
    if split == 'val':
        report_test(ckpts, lambda best: tasks('test', args.test_tasks, best), args.test_tasks, device)


if __name__ == '__main__':
    run_main(main)
