"""Checkpoints and resume: round trips, top-k, and every way a run could lose or corrupt its files."""
import csv
import os

import pytest
import torch

from conftest import ListLoader, fit_args, make_meta, make_tasks, run_fit
from maml import checkpoints
from maml.checkpoints import RunDir, atomic_save, load_checkpoint
from maml.devices import available_device
from maml.errors import DamagedError, FlagError, MissingError, RunError
from maml.flags import make_parser, parse_args
from maml.trainer import fit, report_test
from meta import Meta


def test_round_trip_rebuilds_an_identical_model(tmp_path):
    maml, tasks = make_meta(), make_tasks()
    maml(*tasks)                                  # so that the optimizer has state to save
    path = str(tmp_path / 'm.pth')
    atomic_save(maml.checkpoint(step=7, acc=0.5, ci=0.01), path)
    raw = torch.load(path, weights_only=True)
    assert raw['step'] == 7 and raw['config'] == maml.net.config and raw['hparams']['update_lr'] == 0.3
    loaded = Meta.from_checkpoint(path)
    assert torch.equal(loaded.finetune(*tasks), maml.finetune(*tasks))
    fast, fast_loaded = maml.adapt(tasks[0][0], tasks[1][0]), loaded.adapt(tasks[0][0], tasks[1][0])
    assert torch.equal(maml.net(tasks[2][0], params=fast), loaded.net(tasks[2][0], params=fast_loaded))
    state, state_loaded = maml.meta_optim.state_dict(), loaded.meta_optim.state_dict()
    assert all(torch.equal(state['state'][i]['exp_avg'], state_loaded['state'][i]['exp_avg']) for i in state['state'])


def test_checkpoints_of_older_versions_still_load(tmp_path):
    maml = make_meta()
    old = maml.checkpoint()
    old['hparams'].update(n_way=4, k_spt=2, k_qry=3, task_num=3)   # task shape, once stored by Meta
    atomic_save(old, str(tmp_path / 'old.pth'))
    assert Meta.from_checkpoint(str(tmp_path / 'old.pth')).update_lr == maml.update_lr


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip('needs a machine without CUDA')
    ckpt = make_meta().checkpoint(step=1)
    with monkeypatch.context() as m:   # write the file as torch.save does on a GPU: storages tagged cuda:0
        m.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
        torch.save(ckpt, tmp_path / 'gpu.pth')
    with pytest.raises(RuntimeError, match='CUDA'):
        torch.load(tmp_path / 'gpu.pth', weights_only=True)   # what a plain load does on this machine
    loaded = Meta.from_checkpoint(str(tmp_path / 'gpu.pth'))
    assert next(loaded.parameters()).device.type == 'cpu'


def test_keeps_the_top_k_and_the_best(tmp_path):
    run = RunDir(str(tmp_path), keep=2)
    for step, acc in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.4), (5, 0.8)]:
        run.save(fake_ckpt(step, acc), row={'step': step, 'acc': acc})
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.pth')) == [
        'best.pth', 'last.pth', 'maml_step2_acc0.7000.pth', 'maml_step5_acc0.8000.pth']
    assert torch.load(tmp_path / 'best.pth', weights_only=True)['step'] == 5
    assert torch.load(tmp_path / 'last.pth', weights_only=True)['step'] == 5
    assert [r['step'] for r in run.rows()] == ['1', '2', '3', '4', '5']
    run.close()
    again = RunDir(str(tmp_path), keep=2)    # what a resumed run sees
    again.save(fake_ckpt(6, 0.75), row={'step': 6, 'acc': 0.75})
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith('maml')) == [
        'maml_step5_acc0.8000.pth', 'maml_step6_acc0.7500.pth']
    assert torch.load(tmp_path / 'best.pth', weights_only=True)['step'] == 5


def test_damaged_or_foreign_checkpoints_are_named(tmp_path):
    (tmp_path / 'cut.pth').write_bytes(b'\x80\x02garbage')
    with pytest.raises(DamagedError, match='cut.pth cannot be read'):
        Meta.from_checkpoint(str(tmp_path / 'cut.pth'))
    torch.save({'weights': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(DamagedError, match='not a MAML checkpoint'):
        load_checkpoint(str(tmp_path / 'other.pth'))
    with pytest.raises(MissingError, match='does not exist'):
        load_checkpoint(str(tmp_path / 'nothing.pth'))
    torch.save(fake_ckpt(1, 0.5), tmp_path / 'whole.pth')
    whole = (tmp_path / 'whole.pth').read_bytes()
    for name, content in (('empty', b''), ('half', whole[:len(whole) // 2]), ('tail', whole[:-10]),
                          ('text', b'not a checkpoint')):
        (tmp_path / f'{name}.pth').write_bytes(content)
        with pytest.raises(DamagedError, match=f'{name}.pth cannot be read'):
            load_checkpoint(str(tmp_path / f'{name}.pth'))


@pytest.mark.parametrize('error', [
    torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'),
    RuntimeError('Attempting to deserialize object on CUDA device 1 but torch.cuda.device_count() is 1.')])
def test_device_and_memory_errors_are_not_called_damage(tmp_path, monkeypatch, error):
    """Only a damaged archive or pickle means a damaged file: running out of memory keeps its
    traceback, and a GPU this machine lacks is named as such."""
    torch.save(fake_ckpt(1, 0.5), tmp_path / 'whole.pth')

    def load(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch, 'load', load)
    with pytest.raises(Exception) as raised:
        load_checkpoint(str(tmp_path / 'whole.pth'))
    assert not isinstance(raised.value, DamagedError)
    if isinstance(error, torch.OutOfMemoryError):
        assert raised.value is error
    else:
        assert isinstance(raised.value, FlagError) and 'saved on a GPU this machine lacks' in str(raised.value)


def test_non_finite_weights_are_never_written(tmp_path):
    run = RunDir(str(tmp_path), keep=2)
    run.save(fake_ckpt(1, 0.5), row={'step': 1, 'acc': 0.5})
    before = snapshot(tmp_path)
    bad = fake_ckpt(2, 0.9)
    bad['model']['w'][0] = float('nan')
    with pytest.raises(RunError, match='1 non-finite values at step 2, so nothing was saved'):
        run.save(bad, row={'step': 2, 'acc': 0.9})
    assert snapshot(tmp_path) == before


def test_a_second_run_cannot_write_into_a_locked_folder(tmp_path):
    first = RunDir(str(tmp_path), keep=2)
    with pytest.raises(RunError, match='Another run is writing to'):
        RunDir(str(tmp_path), keep=2)
    first.close()
    RunDir(str(tmp_path), keep=2).close()


def test_resume_continues_where_it_stopped_and_a_fresh_run_never_overwrites(tmp_path):
    run_fit(tmp_path, epoch=4)
    with pytest.raises(RunError, match='already holds checkpoints of an earlier run'):
        run_fit(tmp_path, epoch=4)
    maml, loader = run_fit(tmp_path, epoch=6, resume=str(tmp_path / 'last.pth'))
    assert loader.calls == 6, 'the resumed run makes only the two missing steps'
    with open(tmp_path / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['step', 'train_acc', 'val_acc', 'val_ci', 'ms_per_step', 'elapsed_s']
    assert [r['step'] for r in rows] == ['2', '4', '6']
    last = torch.load(tmp_path / 'last.pth', weights_only=True)
    assert last['step'] == 6 and torch.equal(last['model']['vars.0'], maml.net.vars[0].detach())


def test_a_time_budget_ends_the_run_with_an_evaluation(tmp_path):
    maml, loader = make_meta(), ListLoader()
    args = fit_args(tmp_path, epoch=1000, log_every=3, eval_every=100, time_budget=1e-9)
    fit(maml, loader, loader.next, lambda: maml.finetune(*loader.tasks).numpy(), args).close()
    assert loader.calls == 3, 'the first logging step is past any budget'
    assert [r['step'] for r in checkpoints.read_metrics(tmp_path)] == ['3']
    assert torch.load(tmp_path / 'last.pth', weights_only=True)['step'] == 3


def test_resuming_an_earlier_checkpoint_in_place_is_refused_and_touches_nothing(tmp_path):
    maml, loader = make_meta(), ListLoader()
    args = fit_args(tmp_path, epoch=6, keep=3)
    fit(maml, loader, loader.next, lambda: maml.finetune(*loader.tasks).numpy(), args).close()
    earlier = [f for f in os.listdir(tmp_path) if f.startswith('maml_step2_')]
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match='is an earlier checkpoint of the run in .* discard the evaluations after it'):
        run_fit(tmp_path, epoch=8, resume=str(tmp_path / earlier[0]))
    assert snapshot(tmp_path) == before
    run_fit(tmp_path / 'branch', epoch=8, resume=str(tmp_path / earlier[0]))   # into an empty folder: fine
    run_fit(tmp_path, epoch=8, resume=str(tmp_path / 'last.pth'))   # its own last.pth: fine


def test_a_resume_into_a_new_folder_interrupted_before_its_first_evaluation_can_be_rerun(tmp_path):
    run_fit(tmp_path / 'a', epoch=4)
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'metrics.csv').write_bytes((tmp_path / 'a' / 'metrics.csv').read_bytes())   # adopted, then ^C
    run_fit(tmp_path / 'b', epoch=6, resume=str(tmp_path / 'a' / 'last.pth'))
    assert [r['step'] for r in checkpoints.read_metrics(tmp_path / 'b')] == ['2', '4', '6']


def test_a_folder_whose_run_never_wrote_last_pth_is_named_not_resumed(tmp_path):
    run_fit(tmp_path, epoch=2)
    os.remove(tmp_path / 'last.pth')   # as a kill inside the first evaluation leaves it
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match='stopped in its first evaluation, before any last.pth'):
        run_fit(tmp_path, epoch=2)
    assert snapshot(tmp_path) == before


def test_a_time_budget_counts_this_invocation_only_and_is_not_inherited(tmp_path):
    last = saved_run(tmp_path, '--time_budget', '1e-9')
    assert torch.load(last, weights_only=True)['step'] == 1, 'the budget ended the first part'
    ckpt = torch.load(last, weights_only=True)
    ckpt['elapsed_s'] = 1e9   # earlier parts of the run took far longer than any budget below
    atomic_save(ckpt, last)
    parser = make_parser('test', 'omniglot', 'data')
    assert parse_args(parser, 'omniglot', ['--resume', last, '--epoch', '4']).time_budget is None
    args = parse_args(parser, 'omniglot', ['--resume', last, '--epoch', '4', '--time_budget', '60'])
    maml, loader = make_meta(), ListLoader()
    fit(maml, loader, loader.next, lambda: maml.finetune(*loader.tasks).numpy(), args).close()
    assert torch.load(last, weights_only=True)['step'] == 4, 'a fresh budget for the resumed part'


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, _ = run_fit(tmp_path / 'a', epoch=6)
    run_fit(tmp_path / 'b', epoch=4)
    resumed, _ = run_fit(tmp_path / 'b', epoch=6, resume=str(tmp_path / 'b' / 'last.pth'))
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


def test_resume_into_a_folder_of_another_run_is_refused_and_touches_nothing(tmp_path):
    run_fit(tmp_path / 'a', epoch=4)
    run_fit(tmp_path / 'b', epoch=2)
    before = snapshot(tmp_path / 'b')
    with pytest.raises(RunError, match="holds another run's checkpoints"):
        run_fit(tmp_path / 'b', epoch=6, resume=str(tmp_path / 'a' / 'last.pth'))
    assert snapshot(tmp_path / 'b') == before
    run_fit(tmp_path / 'c', epoch=6, resume=str(tmp_path / 'a' / 'last.pth'))   # an empty folder is fine
    assert [r['step'] for r in checkpoints.read_metrics(tmp_path / 'c')] == ['2', '4', '6']


def test_a_nan_loss_stops_training_before_it_reaches_a_checkpoint(tmp_path):
    run_fit(tmp_path, epoch=2)
    before = snapshot(tmp_path)
    loader = ListLoader()
    loader.tasks = (loader.tasks[0] * float('nan'), *loader.tasks[1:])
    with pytest.raises(RunError, match='meta-loss became nan at step 3'):
        run_fit(tmp_path, epoch=4, resume=str(tmp_path / 'last.pth'), loader=loader)
    assert snapshot(tmp_path) == before


def test_weights_that_become_nan_after_a_finite_loss_are_not_saved(tmp_path):
    run_fit(tmp_path, epoch=2)
    before = snapshot(tmp_path)
    maml = make_meta()
    update = maml.meta_update

    def update_then_break(loss):   # what a huge meta_lr does at step 4: a finite loss, then NaN weights
        update(loss)
        if maml.meta_optim.state[maml.net.vars[0]]['step'] == 4:
            with torch.no_grad():
                maml.net.vars[0][0, 0, 0, 0] = float('nan')
    maml.meta_update = update_then_break
    with pytest.raises(RunError, match='non-finite values at step 4'):
        run_fit(tmp_path, epoch=4, resume=str(tmp_path / 'last.pth'), maml=maml)
    assert snapshot(tmp_path) == before


def test_a_kill_between_an_evaluation_and_last_pth_is_rolled_back_on_resume(tmp_path, monkeypatch):
    run_fit(tmp_path, epoch=2)
    real_save = checkpoints.atomic_save

    def killed_at_last_pth(obj, path):
        if path.endswith('last.pth'):
            open(path + '.tmp', 'wb').close()   # a half-written file, as a kill leaves it
            raise KeyboardInterrupt
        real_save(obj, path)
    monkeypatch.setattr(checkpoints, 'atomic_save', killed_at_last_pth)
    with pytest.raises(RunError, match='interrupted at step 4; resume with --resume'):
        run_fit(tmp_path, epoch=4, resume=str(tmp_path / 'last.pth'))
    assert [r['step'] for r in checkpoints.read_metrics(tmp_path)] == ['2', '4']   # ahead of last.pth
    monkeypatch.setattr(checkpoints, 'atomic_save', real_save)
    run_fit(tmp_path, epoch=6, resume=str(tmp_path / 'last.pth'))
    assert [r['step'] for r in checkpoints.read_metrics(tmp_path)] == ['2', '4', '6']
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
    ranked = [f for f in os.listdir(tmp_path) if f.startswith('maml_step')]
    assert len(ranked) == 2 and len(set(ranked)) == 2


def saved_run(tmp_path, *flags):
    """A finished run's last.pth written by fit with the flags of a real parse."""
    args = parse_args(make_parser('test', 'omniglot', 'data'), 'omniglot',
                      ['--save_dir', str(tmp_path), '--epoch', '2', '--log_every', '1', '--eval_every', '2',
                       *flags])
    maml, loader = make_meta(), ListLoader()
    fit(maml, loader, loader.next, lambda: maml.finetune(*loader.tasks).numpy(), args).close()
    return str(tmp_path / 'last.pth')


def test_resume_takes_the_runs_settings_and_refuses_to_change_them(tmp_path):
    last = saved_run(tmp_path, '--meta_lr', '0.003', '--k_spt', '2')
    parser = make_parser('test', 'omniglot', 'data')
    args = parse_args(parser, 'omniglot', ['--resume', last, '--epoch', '4', '--eval_every', '1'])
    assert (args.meta_lr, args.k_spt, args.eval_every) == (0.003, 2, 1), 'settings from the checkpoint'
    assert args.save_dir == str(tmp_path), 'a resumed run stays in its folder unless told otherwise'
    for flag, value in [('--meta_lr', '0.01'), ('--k_spt', '1'), ('--update_step', '2'), ('--update_lr', '0.1'),
                        ('--num_filters', '32'), ('--preset', 'paper-5w1s')]:
        with pytest.raises(FlagError, match=f'{flag} {value} differs from the'):
            parse_args(parser, 'omniglot', ['--resume', last, '--epoch', '4', flag, value])
    assert parse_args(parser, 'omniglot', ['--resume', last, '--epoch', '4', '--k_spt', '2']).k_spt == 2
    for epoch in (['--epoch', '2'], []):   # without --epoch, the checkpoint's: the run is complete
        with pytest.raises(FlagError, match='--epoch 2 is not beyond step 2'):
            parse_args(parser, 'omniglot', ['--resume', last, *epoch])
    older = torch.load(last, weights_only=True)
    del older['args']['algo'], older['args']['lslr']   # as written before the MAML family existed
    atomic_save(older, str(tmp_path / 'older.pth'))
    with pytest.raises(FlagError, match='--algo anil would change .* predates --algo and so ran as its default maml'):
        parse_args(parser, 'omniglot', ['--resume', str(tmp_path / 'older.pth'), '--epoch', '4', '--algo', 'anil'])
    assert parse_args(parser, 'omniglot', ['--resume', str(tmp_path / 'older.pth'), '--epoch', '4', '--algo', 'maml'])
    moved = saved_run(tmp_path / 'moved', '--data', str(tmp_path / 'absent'))   # data on another machine
    assert parse_args(parser, 'omniglot', ['--resume', moved, '--epoch', '4']).data == 'data', "this machine's"
    with pytest.raises(FlagError, match="was not written by miniimagenet's training script"):
        parse_args(make_parser('test', 'miniimagenet', 'data'), 'miniimagenet', ['--resume', last, '--epoch', '4'])


@pytest.mark.parametrize('flags, problem', [
    (['--imgsz', '3'], '--imgsz 3 is too small'),
    (['--update_lr', '-0.4'], '--update_lr is -0.4 but must be positive'),
    (['--meta_lr', '0'], '--meta_lr is 0.0 but must be positive'),
    (['--n_way', '1'], '--n_way must be at least 2'),
    (['--k_qry_test', '0'], '--k_qry_test is 0 but must be at least 1'),
    (['--grad_clip', '-1'], '--grad_clip is -1.0'),
    (['--time_budget', '0'], '--time_budget is 0.0 minutes but must be positive'),
])
def test_impossible_flags_are_refused_by_name(flags, problem):
    with pytest.raises(FlagError, match=problem):
        parse_args(make_parser('test', 'omniglot', 'data'), 'omniglot', flags)


def test_a_diverging_inner_loop_stops_the_run(tmp_path):
    small = make_meta()
    maml = Meta(small.net.config, **{**small.hparams(), 'update_lr': 1e6}).double()
    with pytest.raises(RunError, match='so the run diverged; lower --meta_lr or --update_lr'):
        run_fit(tmp_path, epoch=4, maml=maml)
    assert not os.path.exists(tmp_path / 'last.pth')


def test_a_run_that_stops_leaves_its_folder_unlocked_while_its_error_lives_on(tmp_path):
    """However a run ends (diverged, interrupted, refused, its test report failing, or done), the
    next RunDir on its folder opens at once in the same process, while the error's traceback,
    which holds the first run, is still alive (as it is in a notebook or under pytest.raises)."""
    def reopen(folder):
        RunDir(str(folder), keep=2).close()   # 'Another run is writing to ...' if the lock were held

    small = make_meta()
    diverging = Meta(small.net.config, **{**small.hparams(), 'update_lr': 1e6}).double()
    with pytest.raises(RunError, match='so the run diverged') as diverged:
        run_fit(tmp_path / 'diverged', epoch=4, maml=diverging)
    reopen(tmp_path / 'diverged')

    maml, loader = make_meta(), ListLoader()

    def interrupted_at_step_3():
        if loader.calls == 2:
            raise KeyboardInterrupt
        return loader.next()
    with pytest.raises(RunError, match='interrupted at step 3; resume with --resume') as interrupted:
        fit(maml, loader, interrupted_at_step_3, lambda: maml.finetune(*loader.tasks).numpy(),
            fit_args(tmp_path / 'interrupted', epoch=6))
    reopen(tmp_path / 'interrupted')
    with pytest.raises(RunError, match='already holds checkpoints of an earlier run') as refused:
        run_fit(tmp_path / 'interrupted', epoch=6)
    reopen(tmp_path / 'interrupted')

    run = fit(maml, loader, loader.next, lambda: maml.finetune(*loader.tasks).numpy(),
              fit_args(tmp_path / 'done', epoch=2))
    with pytest.raises(RunError, match='Another run is writing to'):
        reopen(tmp_path / 'done')   # fit hands the run over still locked, for report_test to write best.pth

    def out_of_memory(best):
        raise RuntimeError('out of memory on the test tasks')
    with pytest.raises(RuntimeError, match='out of memory') as failed_report:
        report_test(run, out_of_memory, 3, torch.device('cpu'))
    reopen(tmp_path / 'done')
    run = fit(maml, loader, loader.next, lambda: maml.finetune(*loader.tasks).numpy(),
              fit_args(tmp_path / 'done', epoch=4, resume=str(tmp_path / 'done' / 'last.pth')))
    report_test(run, lambda best: maml.finetune(*loader.tasks).numpy(), 3, torch.device('cpu'))
    reopen(tmp_path / 'done')
    assert 'test_acc' in load_checkpoint(str(tmp_path / 'done' / 'best.pth'))
    assert all(raised.tb for raised in (diverged, interrupted, refused, failed_report)), 'alive until here'


def test_preset_sets_the_experiment_and_explicit_flags_win():
    parser = make_parser('test', 'omniglot', 'data')
    args = parse_args(parser, 'omniglot', ['--preset', 'paper-5w1s', '--meta_lr', '5e-4'])
    assert (args.k_qry, args.update_step, args.update_lr, args.meta_lr) == (1, 1, 2.0, 5e-4)
    assert parse_args(parser, 'omniglot', []).k_qry == 15, 'without a preset, the seed defaults'


def fake_ckpt(step, acc):
    return {'step': step, 'acc': acc, 'model': {'w': torch.ones(3)}}


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if name != '.lock'}


def test_a_run_folder_that_cannot_be_one_is_one_sentence_and_only_its_own_temporaries_go(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(RunError, match='cannot hold a run'):
        RunDir(str(tmp_path / 'a_file'), keep=2)
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / 'notes.tmp').write_text('a user file')
    (folder / 'best.pth.tmp').write_text('half a checkpoint')
    RunDir(str(folder), keep=2).close()
    assert sorted(os.listdir(folder)) == ['.lock', 'notes.tmp']


def test_a_damaged_best_pth_is_rebuilt_on_resume(tmp_path):
    run_fit(tmp_path, epoch=4)
    (tmp_path / 'best.pth').write_bytes(b'not a checkpoint')
    run_fit(tmp_path, epoch=6, resume=str(tmp_path / 'last.pth'))
    assert load_checkpoint(str(tmp_path / 'best.pth'))['step'] in (2, 4, 6)


def test_a_full_disk_ends_the_run_in_one_sentence_and_keeps_last_pth(tmp_path, monkeypatch):
    run_fit(tmp_path, epoch=2)
    before = snapshot(tmp_path)

    def full_disk(obj, path):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(checkpoints, 'atomic_save', full_disk)
    with pytest.raises(RunError, match=r'failed at step 4 \(No space left on device\); make room there and resume from'):
        run_fit(tmp_path, epoch=4, resume=str(tmp_path / 'last.pth'))
    assert snapshot(tmp_path)['last.pth'] == before['last.pth']


def test_non_finite_family_meta_parameters_are_never_saved():
    ckpt = {'model': {'w': torch.ones(2)}, 'family': {'extras': {'lslr.0': torch.tensor([0.4, float('nan')])}}}
    with pytest.raises(RunError, match='1 non-finite values at step 3'):
        checkpoints.check_finite(ckpt, 3)


def test_a_folder_or_an_absent_gpu_is_named_in_one_sentence(tmp_path):
    with pytest.raises(MissingError, match='is a folder, not a checkpoint; pass a .pth file in it'):
        load_checkpoint(str(tmp_path))
    if not torch.cuda.is_available():
        with pytest.raises(FlagError, match='--device cuda was asked for but this machine has no CUDA GPU'):
            available_device('cuda')


def test_ranking_after_a_resume_uses_the_stored_accuracy_not_the_rounded_name(tmp_path):
    ckpt = make_meta().checkpoint(step=2, acc=0.95004)
    run = RunDir(str(tmp_path), keep=2)
    run.save(ckpt, {'step': 2, 'val_acc': 0.95004})
    run.close()
    reopened = RunDir(str(tmp_path), keep=2)
    reopened.save({**ckpt, 'step': 4, 'acc': 0.95001}, {'step': 4, 'val_acc': 0.95001})
    reopened.close()
    assert load_checkpoint(str(tmp_path / 'best.pth'))['step'] == 2, '0.95001 does not beat 0.95004'


def test_a_lower_keep_on_resume_evicts_the_extra_checkpoints_at_the_next_evaluation(tmp_path):
    run_fit(tmp_path, epoch=4)   # keep=2: two ranked files
    maml, loader = make_meta(), ListLoader()
    args = fit_args(tmp_path, epoch=6, resume=str(tmp_path / 'last.pth'), keep=1)
    fit(maml, loader, loader.next, lambda: maml.finetune(*loader.tasks).numpy(), args).close()
    assert len([f for f in os.listdir(tmp_path) if f.startswith('maml_step')]) == 1
