"""
Meta-train MAML on mini-ImageNet (N-way K-shot classification, Finn et al. 2017, section 5.2).

    python miniimagenet_train.py                              # 5-way 1-shot, the paper's settings
    python miniimagenet_train.py --k_spt 5 --task_num 2       # 5-way 5-shot
    python miniimagenet_train.py --resume checkpoints/last.pth

DATA_ROOT (or --data) holds images/*.jpg and train.csv, val.csv, test.csv (see README). Each split
is decoded once into a uint8 cache under <data>/cache and episodes are sampled on the device.
Checkpoints are ranked by accuracy on --eval_tasks validation tasks; the test split is touched
only at the end, to report the selected model (best.pth) over --test_tasks tasks.
"""
import os

from meta import Meta
from MiniImagenet import MiniImagenetCache
from trainer import check_args, common_args, describe, evaluate, fit, report_test, run_main, setup_device

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'miniimagenet')
EVAL_SEED = 12345   # the validation tasks of every evaluation, so that checkpoints compare on equal terms
EVAL_BATCH = 8      # tasks fine-tuned at once when evaluating (no meta-gradient, so more fit)


def network(n_way, imgsz, filters=32):
    """The paper's MiniImagenet net: 4 x [conv 3x3 pad 1, batch norm, ReLU, max-pool 2], then linear."""
    config, side = [], imgsz
    for i in range(4):
        config += [('conv2d', [filters, 3 if i == 0 else filters, 3, 3, 1, 1]), ('bn', [filters]),
                   ('relu', []), ('max_pool2d', [2, 2, 0])]
        side //= 2
    return config + [('flatten', []), ('linear', [n_way, filters * side * side])]


def main():
    parser = common_args(__doc__.strip().splitlines()[0], epoch=60000, n_way=5, k_spt=1, k_qry=15, imgsz=84,
                         imgc=3, task_num=4, meta_lr=1e-3, update_lr=0.01, update_step=5, update_step_test=10,
                         num_filters=32, data=DATA_ROOT, log_every=30)
    args = parser.parse_args()
    check_args(args)
    device = setup_device(args)

    splits = {mode: MiniImagenetCache(args.data, mode, resize=args.imgsz, device=device, seed=args.seed)
              for mode in ('train', 'val', 'test')}
    maml = Meta(args, network(args.n_way, args.imgsz, args.num_filters)).to(device)
    print(f'{describe(device)}\n{maml.net}\n{vars(args)}')

    def tasks(mode, n_tasks, net=maml):
        splits[mode].reset(EVAL_SEED)
        sample = lambda: splits[mode].sample(EVAL_BATCH, args.n_way, args.k_spt, args.k_qry)
        return evaluate(net, sample, n_tasks)

    train = splits['train']
    ckpts = fit(maml, train, lambda: train.sample(args.task_num, args.n_way, args.k_spt, args.k_qry),
                lambda: tasks('val', args.eval_tasks), args, split='val')

    report_test(ckpts, lambda best: tasks('test', args.test_tasks, best), args.test_tasks, device)


if __name__ == '__main__':
    run_main(main)
