"""
Meta-step throughput under torchrun (maml/distributed.py) on random Omniglot-shaped tasks (5-way 1-shot,
15 query images, 28x28, the paper's 64-filter net, one inner step, second order), the global
meta-batch BENCH_TASKS (default 8) split over the ranks.

    python benchmarks/bench_distributed.py --threads 1                          # one process, one thread
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_distributed.py    # two ranks (one thread each)

Prints one line on rank 0: ranks, threads per rank, ms/step, images/s, and the share of a step
spent in the gradient all-reduce (timed separately on the same gradients).
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository's modules
from maml import distributed
from meta import Meta
from omniglot_train import network

TASKS = int(os.environ.get('BENCH_TASKS', 8))   # the global meta-batch
N_WAY, K_SPT, K_QRY, SIDE, WARMUP, STEPS = 5, 1, 15, 28, 2, 8


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument('--threads', type=int, help="CPU threads per process (default: torch's)")
    threads = p.parse_args().threads
    distributed.init('cpu')
    if threads:
        torch.set_num_threads(threads)
    local = distributed.local_tasks(TASKS)
    torch.manual_seed(0)
    maml = Meta(network(N_WAY, SIDE), imgc=1, imgsz=SIDE, update_step=1, update_lr=0.4)
    distributed.attach(maml)
    g = torch.Generator().manual_seed(distributed.rank_seed(1))
    x_spt = torch.rand(local, N_WAY * K_SPT, 1, SIDE, SIDE, generator=g)
    x_qry = torch.rand(local, N_WAY * K_QRY, 1, SIDE, SIDE, generator=g)
    y_spt = torch.arange(N_WAY).repeat_interleave(K_SPT).repeat(local, 1)
    y_qry = torch.arange(N_WAY).repeat_interleave(K_QRY).repeat(local, 1)
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            if distributed.active():
                dist.barrier()
            tic = time.perf_counter()
        loss, _ = maml.meta_loss(x_spt, y_spt, x_qry, y_qry, track_steps=False)
        maml.meta_update(loss)
    if distributed.active():
        dist.barrier()
    seconds = (time.perf_counter() - tic) / STEPS
    reduce_s = 0.0
    if distributed.active():
        tic = time.perf_counter()
        for _ in range(STEPS):
            distributed.average_gradients(maml)
        reduce_s = (time.perf_counter() - tic) / STEPS
    images = TASKS * N_WAY * (K_SPT + K_QRY)
    if distributed.is_main():
        print(f'ranks {distributed.world_size()}  threads/rank {torch.get_num_threads()}  '
              f'{1e3 * seconds:.0f} ms/step  {images / seconds:.0f} img/s  all-reduce {1e3 * reduce_s:.1f} ms '
              f'({100 * reduce_s / seconds:.1f}% of a step)', flush=True)
    distributed.leave()


if __name__ == '__main__':
    main()
