"""
Data-parallel meta-training with torch.distributed, started by torchrun; one process changes nothing.

    torchrun --nproc_per_node=4 omniglot_train.py --task_num 32        # 8 tasks per rank
    python omniglot_train.py --task_num 32                             # no process group at all

--task_num is the global meta-batch: each rank draws task_num / world_size tasks from its own
stream (seed `rank_seed(--seed)`, --seed itself on rank 0), and `average_gradients` replaces each
rank's meta-gradient by the mean over ranks before clipping and the Adam step. The meta-loss is a
mean over tasks, so with equal shards that is the meta-gradient of the whole meta-batch, and every
rank takes the same step from the same weights (rank 0's, broadcast by `attach`). The ranks agree
on everything that decides whether training goes on: the loss they check is `mean_over_ranks`,
their weights are identical, and what one rank alone does (rank 0's run folder, loading data
`in_turn`) ends in `stop_together`, so a problem on one rank stops all of them, never a hang.

Rank 0 alone prints (the other ranks' stdout goes to /dev/null; stderr stays), owns the run
folder and writes checkpoints. A checkpoint stores every rank's sampler state ('rank_samplers',
in rank order) beside rank 0's ('sampler', all a one-process run has), so that resuming on M ranks
gives rank r the state rank r saved; ranks the writing run did not have start their stream afresh.
"""
import contextlib
import datetime
import importlib
import io
import os
import sys

import torch
import torch.distributed as dist

from .checkpoints import load_checkpoint
from .errors import FlagError, RunError, UserError

RANK_SEED_STRIDE = 1_000_003   # rank r's stream is seeded --seed + r * this, far from the loaders' seed + i
BUCKET_BYTES = 32 << 20        # gradients are all-reduced in flat buffers of at most this size
# how long a rank waits for the others; long enough for rank 0 to download and decode a data set
TIMEOUT = datetime.timedelta(minutes=30)
_device = torch.device('cpu')   # this rank's device (init): an NCCL group takes tensors there only


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    """Whether this process speaks for the run: rank 0, or before the process group exists, the
    process torchrun started as rank 0 (so that a bad flag is reported once, not once per rank)."""
    return rank() == 0 and os.environ.get('RANK', '0') == '0'


def init(device):
    """Join torchrun's process group when it started more than one process (NCCL on CUDA, gloo on
    the CPU) and return this rank's device: GPU LOCAL_RANK for a CUDA --device, else `device`
    with the CPU cores shared out between the ranks of this machine. Without torchrun, or with a
    single process, nothing happens and `device` is returned as it is."""
    global _device
    device = torch.device(device)
    if int(os.environ.get('WORLD_SIZE', '1')) < 2 or active():
        return device
    # Imported while there is no group yet: its functions take group.WORLD, the group of the moment, as
    # a default argument, and a group held there outlives destroy_process_group (see `leave`). The
    # first optimizer imports it (through torch._dynamo), and Meta's is made after this.
    importlib.import_module('torch.distributed.nn')
    local_rank, local_size = int(os.environ['LOCAL_RANK']), int(os.environ['LOCAL_WORLD_SIZE'])
    if device.type == 'cuda':
        if local_size > torch.cuda.device_count():
            raise FlagError(f"torchrun started {local_size} processes on this machine, which has "
                            f"{torch.cuda.device_count()} GPUs; pass --nproc_per_node "
                            f"{torch.cuda.device_count()} or fewer.")
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', timeout=TIMEOUT, device_id=device)
    else:
        # torchrun sets OMP_NUM_THREADS=1; the ranks of one machine share its cores instead
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_size))
        dist.init_process_group('gloo', timeout=TIMEOUT)
    if rank() != 0:
        sys.stdout = open(os.devnull, 'w')
    _device = device
    return device


def leave():
    """Leave the process group: its threads (gloo's workers and socket loop, and the TCPStore server
    that rank 0 hosts when torchrun's agent does not) end here, rather than run on into the
    interpreter's shutdown and the process's exit, where a rank could abort ('terminate called
    without an active exception'). They end only if nothing else holds the group; see `init`."""
    if active():
        dist.destroy_process_group()


@contextlib.contextmanager
def in_turn():
    """Run the block on rank 0 first, then on the first rank of each other machine, then on the rest:
    so that the one rank that finds no data cache builds it (download, decode) while no other rank
    that shares its file system writes the same files, and the others read it."""
    if world_size() < 2:
        yield
        return
    turn = 0 if rank() == 0 else 1 if int(os.environ.get('LOCAL_RANK', '0')) == 0 else 2
    for this_turn in range(3):
        error = None
        if this_turn == turn:
            try:
                yield
            except Exception as e:
                error = e
        stop_together(error)


def local_tasks(task_num):
    """This rank's share of the global meta-batch of `task_num` tasks."""
    if task_num % world_size():
        raise FlagError(f"--task_num {task_num} cannot be split evenly over {world_size()} ranks; pass a "
                        f"multiple of {world_size()} or start another number of processes.")
    return task_num // world_size()


def rank_seed(seed):
    """The seed of this rank's training episodes: `seed` itself on rank 0 (and in one process)."""
    return seed + RANK_SEED_STRIDE * rank()


def _buckets(tensors):
    """`tensors` in consecutive groups of one dtype and device, at most BUCKET_BYTES each."""
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > BUCKET_BYTES or (t.dtype, t.device) != (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _flat_collective(tensors, collective):
    """Apply `collective` (in place, on a flat buffer) to each bucket of `tensors`, written back."""
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        collective(flat)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))


def average_gradients(module):
    """Each parameter's .grad, and each floating-point buffer (MAML++'s running statistics, which
    each rank moved towards its own tasks' statistics), becomes its mean over the ranks
    (Meta.grad_reducer): the same values as one process with the whole meta-batch."""
    size = world_size()

    def mean(flat):
        dist.all_reduce(flat)
        flat.div_(size)
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    _flat_collective([p.grad for p in module.parameters() if p.grad is not None] + buffers, mean)


def attach(maml):
    """Make `maml` train as one of the ranks: rank 0's meta-parameters everywhere, meta-gradients
    averaged over ranks at every meta_update. Nothing happens in one process."""
    if world_size() < 2:
        return
    with torch.no_grad():
        state = list(maml.parameters()) + [b for b in maml.buffers() if b.is_floating_point()]
        _flat_collective(state, lambda flat: dist.broadcast(flat, 0))
    maml.grad_reducer = average_gradients


def mean_over_ranks(*tensors):
    """The mean over ranks of each tensor (one all-reduce, on this rank's device, for all of them,
    wherever they are), returned where each was; as given in one process."""
    if world_size() < 2:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).to(_device, torch.float64) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    return tuple(part.view_as(t).to(t.device, t.dtype) for t, part in zip(tensors, flat.split([t.numel() for t in tensors])))


def gather_in_order(mine):
    """Every rank's list `mine` holds items i, i + N, i + 2N, ... (i its rank, N ranks) of one sequence:
    return the whole sequence, in order, on every rank. The items are tensors; those of other ranks
    arrive on the CPU."""
    if world_size() < 2:
        return mine
    lists = [None] * world_size()
    dist.all_gather_object(lists, [item.cpu() for item in mine])
    return [lists[i % len(lists)][i // len(lists)] for i in range(sum(map(len, lists)))]


def stop_together(error):
    """Every rank passes the exception it caught, or None: if any rank has one, every rank raises,
    its own or else the first rank's (a named problem as it is, anything else as a RunError)."""
    errors = [None] * world_size()
    dist.all_gather_object(errors, error if error is None or isinstance(error, UserError) else
                           RunError(f"rank {rank()} stopped with {type(error).__name__}: {error}"))
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def on_main(fn, share=False):
    """Call fn() on rank 0 only; with `share` its result reaches every rank, else the others get None.
    An error fn raises is raised on every rank, so that none waits for a rank that stopped."""
    if world_size() < 2:
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    stop_together(error)
    if not share:
        return result
    message = [result]
    dist.broadcast_object_list(message, 0)
    return message[0]


def load_shared_checkpoint(path, map_location):
    """load_checkpoint(path) on every rank, from rank 0's copy (the other machines need not see it)."""
    if world_size() < 2:
        return load_checkpoint(path, map_location=map_location)

    def read():
        load_checkpoint(path, map_location='cpu')   # a missing or damaged file is named here
        with open(path, 'rb') as f:
            return f.read()
    return torch.load(io.BytesIO(on_main(read, share=True)), map_location=map_location, weights_only=True)


def sampler_states(sampler):
    """What a checkpoint stores of the episode streams (see the top of this file)."""
    state = {'sampler': sampler.state_dict()}
    if world_size() > 1:
        state['rank_samplers'] = [None] * world_size()
        dist.all_gather_object(state['rank_samplers'], state['sampler'])
    return state


def load_sampler_state(sampler, ckpt):
    """Give `sampler` the state this rank's stream had in `ckpt`, if that run had this rank."""
    states = ckpt.get('rank_samplers') or ([ckpt['sampler']] if 'sampler' in ckpt else [])
    if rank() < len(states):
        sampler.load_state_dict(states[rank()])


class FollowerRun:
    """What ranks other than 0 have in place of the run folder (checkpoints.RunDir), which rank 0
    alone writes, inside `on_main`: so an error in saving (non-finite weights) stops every rank."""

    def __init__(self, save_dir):
        self.dir = save_dir

    def path(self, name):
        return os.path.join(self.dir, name)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
