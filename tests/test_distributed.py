"""Data-parallel training on two gloo ranks, spawned here as torchrun would start them, against one process."""
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TASKS, ListLoader, fit_args, flat, make_meta, make_tasks, rel_err
from maml import distributed, trainer
from maml.checkpoints import read_metrics
from maml.errors import FlagError, MissingError, RunError

RANKS = 2
LIMIT_S = 300   # a rank waiting for one that never comes would otherwise hang the suite


def run_ranks(worker, *args):
    """worker(rank, *args) in RANKS processes that join one process group through torchrun's
    environment variables and distributed.init, as the training scripts do. As under torchrun, the
    ranks meet at a store this process hosts: its server binds a free port itself (a port found free
    and let go could be taken before a rank binds it), and it outlives every rank."""
    store = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)
    ranks = mp.spawn(_as_rank, args=(store.port, worker, args), nprocs=RANKS, join=False)
    deadline = time.monotonic() + LIMIT_S
    try:
        while not ranks.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f'{RANKS} ranks did not finish within {LIMIT_S} s: some rank waits for another')
    finally:   # however the wait ends, no rank outlives it
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
            process.join()


def _as_rank(rank, port, worker, args):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(RANKS),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(RANKS), TORCHELASTIC_USE_AGENT_STORE='True')
    distributed.init('cpu')
    try:
        worker(rank, *args)
    finally:
        distributed.leave()


def meta_batches():
    """Two successive meta-batches of RANKS * TASKS tasks each."""
    return [[torch.cat(parts) for parts in zip(*(make_tasks(seed + r) for r in range(RANKS)))] for seed in (1, 5)]


def shard(batch, rank):
    return [t[rank * TASKS:(rank + 1) * TASKS] for t in batch]


def meta_steps_worker(rank, out):
    results = {}
    for first_order in (False, True):
        maml = make_meta(update_step=1, first_order=first_order, seed=rank)   # attach gives rank 0's weights
        distributed.attach(maml)
        for batch in meta_batches():
            loss, accs = maml.meta_loss(*shard(batch, rank))
            maml.meta_update(loss)
        loss, accs = distributed.mean_over_ranks(loss.detach(), accs)
        results[first_order] = {'params': [p.detach() for p in maml.net.parameters()],
                                'grads': [p.grad for p in maml.net.parameters()], 'loss': loss, 'accs': accs}
    torch.save(results, os.path.join(out, f'rank{rank}.pt'))


def test_two_ranks_take_the_meta_steps_of_one_process_with_the_whole_meta_batch(tmp_path):
    run_ranks(meta_steps_worker, str(tmp_path))
    for first_order in (False, True):
        maml = make_meta(update_step=1, first_order=first_order)
        for batch in meta_batches():
            loss, accs = maml.meta_loss(*batch)
            maml.meta_update(loss)
        for rank in range(RANKS):
            got = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)[first_order]
            assert rel_err(flat(got['grads']), flat([p.grad for p in maml.net.parameters()])) < 1e-10
            assert rel_err(flat(got['params']), flat(list(maml.net.parameters())).detach()) < 1e-10
            assert abs(got['loss'].item() - loss.item()) < 1e-12 * loss.item()
            assert torch.allclose(got['accs'], accs, rtol=0, atol=1e-6)   # float32 means of 0/1


def eval_stream():
    """next_batch() over a fixed sequence of batches of TASKS random tasks."""
    seeds = iter(range(100, 200))
    return lambda: make_tasks(next(seeds))


EVAL_TASKS = 3 * TASKS + 1   # four batches, the last one cut to one task


def evaluate_worker(rank, out):
    maml, finetuned = make_meta(), []
    finetune = maml.finetune
    maml.finetune = lambda *batch: finetuned.append(len(batch[0])) or finetune(*batch)
    accs = trainer.evaluate(maml, eval_stream(), EVAL_TASKS)
    torch.save({'accs': torch.from_numpy(accs), 'finetuned': finetuned}, os.path.join(out, f'rank{rank}.pt'))


def test_a_sharded_evaluation_gives_the_accuracies_of_one_process(tmp_path):
    run_ranks(evaluate_worker, str(tmp_path))
    alone = trainer.evaluate(make_meta(), eval_stream(), EVAL_TASKS)
    assert alone.shape == (EVAL_TASKS, make_meta().update_step_test + 1) and len(np.unique(alone[:, -1])) > 1
    for rank in range(RANKS):
        got = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        assert np.array_equal(got['accs'].numpy(), alone)
        assert got['finetuned'] == [TASKS, TASKS], 'each rank fine-tunes only its half of the four batches'


def rank_loader(rank):
    """The stand-in loader with this rank's own episodes and its own stream position."""
    loader = ListLoader()
    loader.tasks, loader.calls = make_tasks(1 + rank), 100 * rank
    return loader


def fit_on(save_dir, epoch, loader, resume=None):
    """Train as the scripts do, fit and then report_test (which closes the run on every rank)."""
    maml, eval_batch = make_meta(), make_tasks(9)
    validate = lambda: trainer.evaluate(maml, lambda: eval_batch, RANKS * TASKS)
    run = trainer.fit(maml, loader, loader.next, validate, fit_args(save_dir, epoch, resume, task_num=RANKS * TASKS))
    trainer.report_test(run, lambda best: validate(), RANKS * TASKS, torch.device('cpu'))
    return [p.detach() for p in maml.net.parameters()]


def fit_worker(rank, out):
    with pytest.raises(FlagError, match='--task_num 5 cannot be split evenly over 2 ranks'):
        distributed.local_tasks(5)
    straight = fit_on(os.path.join(out, 'a'), 6, rank_loader(rank))
    fit_on(os.path.join(out, 'b'), 4, rank_loader(rank))
    loader = rank_loader(rank)
    resumed = fit_on(os.path.join(out, 'b'), 6, loader, resume=os.path.join(out, 'b', 'last.pth'))
    nan_loader = rank_loader(rank)
    if rank == 1:
        nan_loader.tasks = (nan_loader.tasks[0] * float('nan'), *nan_loader.tasks[1:])
    errors = {}
    for name, save_dir, bad_loader in [('nan', 'c', nan_loader), ('occupied', 'a', rank_loader(rank))]:
        try:
            fit_on(os.path.join(out, save_dir), 4, bad_loader)
        except RunError as e:
            errors[name] = str(e)
    try:
        with distributed.in_turn():   # how the scripts load their data
            if rank == 0:
                raise MissingError('no data here')
    except MissingError as e:
        errors['data'] = str(e)
    torch.save({'straight': straight, 'resumed': resumed, 'calls': loader.calls, 'errors': errors},
               os.path.join(out, f'rank{rank}.pt'))


def test_two_ranks_write_one_run_that_resumes_on_two_ranks_or_one(tmp_path):
    run_ranks(fit_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f'rank{rank}.pt', weights_only=True) for rank in range(RANKS)]
    for rank, got in enumerate(ranks):
        assert all(torch.equal(p, q) for p, q in zip(got['straight'], ranks[0]['straight']))
        assert all(torch.equal(p, q) for p, q in zip(got['resumed'], got['straight'])), 'resume on the same ranks'
        assert got['calls'] == 100 * rank + 6, "each rank's stream goes on from its own saved state"
        assert 'meta-loss became nan at step 1' in got['errors']['nan'], 'every rank stops, none waits'
        assert 'already holds checkpoints' in got['errors']['occupied']
        assert got['errors']['data'] == 'no data here', "rank 0's problem stops rank 1 before its turn"
    folder = tmp_path / 'b'
    assert [r['step'] for r in read_metrics(folder)] == ['2', '4', '6'], 'one row per evaluation'
    assert len([f for f in os.listdir(folder) if f.startswith('maml_step')]) == 2, 'keep=2 ranked checkpoints'
    assert not [f for f in os.listdir(folder) if f.endswith('.tmp')]
    last = torch.load(folder / 'last.pth', weights_only=True)
    assert last['rank_samplers'] == [{'calls': 6}, {'calls': 106}] and last['sampler'] == {'calls': 6}
    assert 'test_acc' in torch.load(folder / 'best.pth', weights_only=True), 'reported by rank 0'
    assert not os.path.exists(tmp_path / 'c' / 'last.pth')

    alone = rank_loader(0)   # the same run resumed by one process: rank 0's stream goes on
    fit_on(folder, 8, alone, resume=str(folder / 'last.pth'))
    assert alone.calls == 8 and [r['step'] for r in read_metrics(folder)] == ['2', '4', '6', '8']
    assert 'rank_samplers' not in torch.load(folder / 'last.pth', weights_only=True)


def leave_worker(rank, out):
    make_meta()   # its optimizer imports torch._dynamo, and with it torch.distributed.nn, as training does
    distributed.gather_in_order([torch.ones(1)])
    distributed.leave()
    threads = [(task / 'comm').read_text().strip() for task in Path('/proc/self/task').iterdir()]
    torch.save(threads, os.path.join(out, f'rank{rank}.pt'))


def test_leaving_ends_the_groups_threads_before_the_interpreter_shuts_down(tmp_path):
    """distributed.leave (run_main's last step) ends the group's threads then, rather than leave them
    running into the interpreter's shutdown and the exit, where the ranks now and then aborted
    ('terminate called without an active exception'): torch.distributed.nn, which Meta's optimizer
    imports, held the group when it was first imported after the group existed."""
    run_ranks(leave_worker, str(tmp_path))
    for rank in range(RANKS):
        threads = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        assert not [t for t in threads if 'gloo' in t or 'tcpstore' in t], threads


def test_a_collective_on_host_values_gets_them_on_the_ranks_device(monkeypatch):
    """An NCCL group takes CUDA tensors only: --time_budget's check used to all-reduce a CPU tensor
    there and crash at the first log step. Here the rank's device is 'meta' and the all-reduce
    records what it is given."""
    given = []

    def all_reduce(tensor):
        given.append(tensor.device)
        raise StopIteration   # the values cannot come back from 'meta'; the device is what is checked
    monkeypatch.setattr(distributed, 'world_size', lambda: 2)
    monkeypatch.setattr(distributed, '_device', torch.device('meta'))
    monkeypatch.setattr(distributed.dist, 'all_reduce', all_reduce)
    for collective in (lambda: trainer.over_budget(1.0, 30.0),
                       lambda: distributed.mean_over_ranks(torch.tensor(0.5), torch.ones(3))):
        with pytest.raises(StopIteration):
            collective()
    assert given == [torch.device('meta')] * 2
