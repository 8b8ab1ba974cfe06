"""Checkpoints: round trip through torch.load(weights_only=True), top-k bookkeeping, clear errors."""
import argparse
import os

import pytest
import torch

from meta import Meta, load_checkpoint
from test_meta import make_meta, make_tasks
from trainer import Checkpoints, atomic_save, fit


def test_round_trip_rebuilds_an_identical_model(tmp_path):
    maml, tasks = make_meta(), make_tasks()
    maml(*tasks)                                  # so that the optimizer has state to save
    path = str(tmp_path / 'm.pth')
    atomic_save(maml.checkpoint(step=7, acc=0.5, ci=0.01), path)
    raw = torch.load(path, weights_only=True)
    assert raw['step'] == 7 and raw['config'] == maml.net.config and raw['hparams']['update_lr'] == 0.3
    loaded = Meta.from_checkpoint(path)
    assert torch.equal(loaded.finetunning(*tasks), maml.finetunning(*tasks))
    fast, fast_loaded = maml.adapt(tasks[0][0], tasks[1][0]), loaded.adapt(tasks[0][0], tasks[1][0])
    assert torch.equal(maml.net(tasks[2][0], params=fast), loaded.net(tasks[2][0], params=fast_loaded))
    state, state_loaded = maml.meta_optim.state_dict(), loaded.meta_optim.state_dict()
    assert all(torch.equal(state['state'][i]['exp_avg'], state_loaded['state'][i]['exp_avg']) for i in state['state'])


def test_keeps_the_top_k_and_the_best(tmp_path):
    ckpts = Checkpoints(str(tmp_path), keep=2)
    for step, acc in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.4), (5, 0.8)]:
        ckpts.save({'step': step}, step, acc)
    assert sorted(os.listdir(tmp_path)) == ['best.pth', 'last.pth', 'maml_step2_acc0.7000.pth',
                                            'maml_step5_acc0.8000.pth']
    assert torch.load(tmp_path / 'best.pth', weights_only=True)['step'] == 5
    assert torch.load(tmp_path / 'last.pth', weights_only=True)['step'] == 5
    again = Checkpoints(str(tmp_path), keep=2)    # what a resumed run sees
    again.save({'step': 6}, 6, 0.75)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith('maml')) == [
        'maml_step5_acc0.8000.pth', 'maml_step6_acc0.7500.pth']
    assert torch.load(tmp_path / 'best.pth', weights_only=True)['step'] == 5


def test_damaged_or_foreign_checkpoints_are_named(tmp_path):
    (tmp_path / 'cut.pth').write_bytes(b'\x80\x02garbage')
    with pytest.raises(RuntimeError, match='cut.pth cannot be read'):
        Meta.from_checkpoint(str(tmp_path / 'cut.pth'))
    torch.save({'weights': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(RuntimeError, match='not a MAML checkpoint'):
        load_checkpoint(str(tmp_path / 'other.pth'))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_checkpoint(str(tmp_path / 'nothing.pth'))


class ListLoader:
    """A stand-in episode source with the sampler-state interface of the loaders."""

    def __init__(self):
        self.tasks, self.calls = make_tasks(), 0

    def next(self):
        self.calls += 1
        return self.tasks

    def state_dict(self):
        return {'calls': self.calls}

    def load_state_dict(self, state):
        self.calls = state['calls']


def run_fit(tmp_path, epoch, resume=None):
    maml, loader = make_meta(), ListLoader()
    args = argparse.Namespace(epoch=epoch, task_num=3, n_way=4, k_spt=2, k_qry=3, log_every=2, eval_every=2,
                              eval_tasks=3, save_dir=str(tmp_path), keep=2, resume=resume)
    fit(maml, loader, loader.next, lambda: maml.finetunning(*loader.tasks).numpy(), args)
    return maml, loader


def test_resume_continues_from_the_saved_step_and_a_fresh_run_never_overwrites(tmp_path, capsys):
    run_fit(tmp_path, epoch=4)
    assert '4' in capsys.readouterr().out
    with pytest.raises(RuntimeError, match='already holds checkpoints of an earlier run'):
        run_fit(tmp_path, epoch=4)
    maml, loader = run_fit(tmp_path, epoch=6, resume=str(tmp_path / 'last.pth'))
    assert loader.calls == 6, 'the resumed run makes only the two missing steps'
    rows = (tmp_path / 'metrics.csv').read_text().splitlines()
    assert rows[0] == 'step,train_acc,test_acc,test_ci,ms_per_step'
    assert [r.split(',')[0] for r in rows[1:]] == ['2', '4', '6']
    last = torch.load(tmp_path / 'last.pth', weights_only=True)
    assert last['step'] == 6 and torch.equal(last['model']['vars.0'], maml.net.vars[0].detach())


def test_a_nan_loss_stops_training_before_it_reaches_a_checkpoint(tmp_path):
    run_fit(tmp_path, epoch=2)
    saved = (tmp_path / 'last.pth').read_bytes()
    maml, loader = make_meta(), ListLoader()
    loader.tasks = (loader.tasks[0] * float('nan'), *loader.tasks[1:])
    args = argparse.Namespace(epoch=4, task_num=3, n_way=4, k_spt=2, k_qry=3, log_every=10, eval_every=4,
                              eval_tasks=3, save_dir=str(tmp_path), keep=2, resume=str(tmp_path / 'last.pth'))
    with pytest.raises(RuntimeError, match='meta-loss became nan at step 4'):
        fit(maml, loader, loader.next, lambda: maml.finetunning(*loader.tasks).numpy(), args)
    assert (tmp_path / 'last.pth').read_bytes() == saved

