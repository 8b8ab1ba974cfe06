"""
A few meta-steps of Meta under torch.cuda.set_sync_debug_mode('error'), so that a host-device sync
left in a training step fails loudly instead of quietly stalling the GPU (checks of gpu/plan.py).

    python gpu/sync_check.py meta --device cuda              # plain MAML
    python gpu/sync_check.py maml++ --device cuda            # --preset maml++, multi-step loss on
    python gpu/sync_check.py from-checkpoint --device cuda   # a Meta from Meta.from_checkpoint, trained
    python gpu/sync_check.py sampling --device cuda          # the Omniglot loader drawing batches

The run's flags, loader and Meta are the training script's own (omniglot_train.py), narrowed by
TINY. The batches are drawn and one step is taken before the mode is set, since cuDNN's autotuner
and first allocations may wait for the device once; `sampling` checks the draws themselves. On the
CPU nothing can wait for a device: the same steps run without the mode, a dry run of this script.
"""
import argparse
import contextlib
import os
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository's modules
from maml.devices import device_name
from maml.errors import RunError
from maml.flags import parse_args
from maml.trainer import run_main, setup_device
from meta import Meta
from omniglot_train import DATA_ROOT, build_parser, make_loader, network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ('meta', 'maml++', 'from-checkpoint', 'sampling')
# the paper presets' per-task rotation on, so that its draw is on the checked path too
TINY = ['--task_num', '4', '--k_qry', '2', '--num_filters', '16', '--update_step', '2', '--epoch', '100',
        '--rotate', 'per_task']


@contextlib.contextmanager
def syncs_raise(device):
    """Inside: any operation that makes the host wait for `device` raises (nothing on the CPU)."""
    if device.type != 'cuda':
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode('error')
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize(device)


def where(error):
    """'file:line in function' of the innermost frame of this repository in the error's traceback,
    and of the innermost frame overall (in torch, usually)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(REPO + os.sep)] or frames
    show = lambda f: f'{os.path.relpath(f.filename, REPO) if f in ours else f.filename}:{f.lineno} in {f.name}'
    return show(ours[-1]), show(frames[-1])


def main(argv=None):
    """Draw the batches, warm up, then take --steps meta-steps (or draws) with host-device syncs raising."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    p.add_argument('variant', choices=VARIANTS)
    p.add_argument('--data', default=DATA_ROOT, help='Omniglot data root')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--steps', type=int, default=3, help='meta-steps (or batches drawn) under the mode')
    flags = p.parse_args(argv)
    preset = ['--preset', 'maml++'] if flags.variant == 'maml++' else []
    args = parse_args(build_parser(), 'omniglot', [*preset, *TINY, '--data', flags.data, '--device', flags.device])
    device = setup_device(args)
    db = make_loader(args, device)
    maml = Meta(args, network(args.n_way, args.imgsz, args.num_filters), imgc=1).to(device)
    batches = [db.next('train') for _ in range(flags.steps + 1)]
    maml(*batches.pop(), track_steps=True)   # warm-up
    if flags.variant == 'from-checkpoint':
        with tempfile.TemporaryDirectory() as folder:
            torch.save(maml.checkpoint(), os.path.join(folder, 'maml.pth'))
            maml = Meta.from_checkpoint(os.path.join(folder, 'maml.pth'), map_location=device)
    try:
        with syncs_raise(device):
            for i in range(flags.steps):
                if flags.variant == 'sampling':
                    db.next('train')
                    db.next('test', k_query=1)
                else:   # a logging step first (per-step accuracies), then plain ones
                    maml(*batches[i], track_steps=i == 0)
    except RuntimeError as e:
        if 'synchroniz' not in str(e):
            raise
        ours, innermost = where(e)
        raise RunError(f"the {flags.variant} step made the host wait for the GPU at {ours} (in {innermost}); "
                       f"keep that value on the device, or move it off the step's path.") from None
    what = 'batches drawn' if flags.variant == 'sampling' else 'meta-steps'
    how = 'without a host-device sync' if device.type == 'cuda' else 'run without the mode (no device to sync with)'
    print(f"{flags.variant}: {flags.steps} {what} on {device_name(device)}, torch {torch.__version__}, {how}")


if __name__ == '__main__':
    run_main(lambda: main(sys.argv[1:]))
