"""The MAML family (maml/family.py options of meta.py's engine) against independent float64 references."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIG, SIDE, TASKS, flat, make_tasks, rel_err
from maml.errors import FlagError
from maml.family import MAMLPP, msl_weights
from meta import Meta

LR, STEPS = 0.25, 2   # a learning rate that float32, where learned ones start, holds exactly


def make(seed=0, **options):
    torch.manual_seed(seed)
    hparams = dict(update_lr=LR, meta_lr=1e-3, update_step=STEPS, update_step_test=3)
    return Meta(CONFIG, imgc=1, imgsz=SIDE, **{**hparams, **options}).double()


def reference_net(x, w, running=None):
    """CONFIG written with torch's own batch norm: batch statistics, or `running` [(mean, var)] per layer."""
    for layer, i in enumerate((0, 4)):
        x = F.conv2d(x, w[i], w[i + 1], stride=2, padding=1)
        mean, var = running[layer] if running else (None, None)
        x = F.relu(F.batch_norm(x, mean, var, w[i + 2], w[i + 3], training=running is None))
    return F.linear(x.flatten(1), w[8], w[9])


def reference_adapt(theta, x, y, lr=lambda i, k: LR, adapted=range(10), first_order=False):
    """Weights after 0..STEPS inner SGD steps on (x, y), moving only the parameters in `adapted`."""
    versions, adapted = [list(theta)], list(adapted)
    for k in range(STEPS):
        fast = list(versions[-1])
        grads = torch.autograd.grad(F.cross_entropy(reference_net(x, fast), y), [fast[i] for i in adapted],
                                    create_graph=not first_order)
        for i, g in zip(adapted, grads):
            fast[i] = fast[i] - lr(i, k) * g
        versions.append(fast)
    return versions


def query_losses(maml, tasks, **adapt_options):
    """[STEPS] mean over tasks of the query loss after 1..STEPS inner steps, task by task."""
    theta = list(maml.net.parameters())
    per_task = [torch.stack([F.cross_entropy(reference_net(x_qry, w), y_qry)
                             for w in reference_adapt(theta, x_spt, y_spt, **adapt_options)[1:]])
                for x_spt, y_spt, x_qry, y_qry in zip(*tasks)]
    return torch.stack(per_task).mean(0)


def grads_of(loss, params):
    return flat(torch.autograd.grad(loss, list(params)))


def test_msl_weights_start_uniform_sum_to_one_and_anneal_to_the_last_step():
    assert torch.allclose(msl_weights(5, 0.0), torch.full((5,), 0.2, dtype=torch.float64), rtol=1e-15, atol=0)
    for progress in (0.0, 0.3, 0.9, 0.99):
        assert abs(msl_weights(5, progress).sum().item() - 1) < 1e-12
    early, late = msl_weights(5, 0.3), msl_weights(5, 0.9)
    assert (late[:-1] < early[:-1]).all() and late[-1] > early[-1]
    assert torch.allclose(msl_weights(5, 0.99)[:-1], torch.full((4,), 0.03 / 5, dtype=torch.float64))


@pytest.mark.parametrize('progress_steps', [0, 3])
def test_msl_meta_loss_weights_every_steps_query_loss(progress_steps):
    maml, tasks = make(msl_steps=5), make_tasks()
    maml.meta_steps_done = progress_steps
    weights = maml.step_weights()
    assert torch.equal(weights, msl_weights(STEPS, progress_steps / 5)) and (weights > 0).all()
    loss, _ = maml.meta_loss(*tasks, track_steps=False)
    ref_loss = (query_losses(maml, tasks) * weights).sum()
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    params = list(maml.net.parameters())
    assert rel_err(grads_of(loss, params), grads_of(ref_loss, params)) < 1e-8


def test_msl_with_all_weight_on_the_last_step_is_plain_maml_exactly():
    tasks = make_tasks()
    msl, plain = make(msl_steps=5), make()
    msl.step_weights = lambda: torch.tensor([0.0, 1.0], dtype=torch.float64)
    for track_steps in (False, True):
        loss, accs = msl.meta_loss(*tasks, track_steps=track_steps)
        ref_loss, ref_accs = plain.meta_loss(*tasks, track_steps=track_steps)
        assert torch.equal(loss, ref_loss) and torch.equal(accs, ref_accs)
        assert torch.equal(grads_of(loss, msl.net.parameters()), grads_of(ref_loss, plain.net.parameters()))
    annealed = make(msl_steps=5)
    annealed.meta_steps_done = 5
    assert annealed.step_weights() is None, 'after the annealing only the last step counts'


@pytest.mark.parametrize('options', [dict(lslr=True), dict(algo='metasgd')])
def test_learned_inner_rates_start_as_plain_maml_get_gradients_and_move(options):
    tasks = make_tasks()
    maml, plain = make(**options), make()
    loss, _ = maml.meta_loss(*tasks)
    ref_loss, _ = plain.meta_loss(*tasks)
    assert torch.equal(loss, ref_loss)
    lrs = list(maml.extras.lrs)
    theta = list(maml.net.parameters())
    grads = torch.autograd.grad(loss, theta + lrs, retain_graph=True)
    assert rel_err(flat(grads[:len(theta)]), grads_of(ref_loss, plain.net.parameters())) < 1e-12
    # reference: the same inner loop with the learning rates as leaf tensors of its own
    ref_lrs = [lr.detach().clone().requires_grad_() for lr in lrs]
    per_step = options.get('lslr', False)
    ref = query_losses(maml, tasks, lr=lambda i, k: ref_lrs[i][k] if per_step else ref_lrs[i])[-1]
    assert rel_err(flat(grads[len(theta):]), grads_of(ref, ref_lrs)) < 1e-8
    # the rates of the conv biases before batch norm, which cannot change the output, get round-off only
    learning = [g.abs().max() > 1e-9 for g in grads[len(theta):]]
    assert sum(learning) == len(lrs) - 2
    before = [lr.detach().clone() for lr in lrs]
    maml.meta_update(loss)
    assert [not torch.equal(a, b) for a, b in zip(before, maml.extras.lrs)] == learning


def test_anil_adapts_only_the_head_and_its_meta_gradient_matches_a_per_task_reference():
    maml, tasks = make(algo='anil'), make_tasks()
    theta = list(maml.net.parameters())
    weights = maml.adapt(tasks[0][0], tasks[1][0])
    names = [name for name, _ in maml.net.named_parameters()]
    assert all(torch.equal(weights[n], p) for n, p in zip(names[:8], theta[:8])), 'the body must not adapt'
    assert not torch.equal(weights[names[8]], theta[8])
    loss, _ = maml.meta_loss(*tasks)
    ref_loss = query_losses(maml, tasks, adapted=(8, 9))[-1]
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert rel_err(grads_of(loss, theta), grads_of(ref_loss, theta)) < 1e-8


def test_reptile_step_moves_theta_towards_the_mean_adapted_weights_with_adam():
    maml, tasks = make(algo='reptile'), make_tasks()
    theta = [p.detach().clone().requires_grad_() for p in maml.net.parameters()]
    adapted = [reference_adapt(theta, x_spt, y_spt, first_order=True)[-1] for x_spt, y_spt in zip(*tasks[:2])]
    direction = [(w - torch.stack([task[i] for task in adapted]).mean(0)).detach() for i, w in enumerate(theta)]
    maml(*tasks)
    assert rel_err(flat([p.grad for p in maml.net.parameters()]), flat(direction)) < 1e-10
    adam = torch.optim.Adam(theta, lr=1e-3)
    for w, d in zip(theta, direction):
        w.grad = d
    adam.step()
    for w, p, d in zip(theta, maml.net.parameters(), direction):
        defined = d.abs() > 1e-9   # Adam turns the round-off gradient of a bias before batch norm into +-lr
        assert torch.allclose(w[defined], p[defined], rtol=0, atol=1e-12)


def test_derivative_order_annealing_is_first_order_then_second_order():
    tasks = make_tasks()
    maml = make(da_steps=2)
    for expected, steps_done in ((make(first_order=True), 1), (make(), 2)):
        maml.meta_steps_done = steps_done
        loss, _ = maml.meta_loss(*tasks)
        ref_loss, _ = expected.meta_loss(*tasks)
        assert torch.equal(grads_of(loss, maml.net.parameters()), grads_of(ref_loss, expected.net.parameters()))
    first, second = make(first_order=True), make()
    assert rel_err(grads_of(first.meta_loss(*tasks)[0], first.net.parameters()),
                   grads_of(second.meta_loss(*tasks)[0], second.net.parameters())) > 1e-3


def test_per_step_running_statistics_are_tracked_in_training_and_used_in_evaluation():
    maml, tasks = make(bnrs=True), make_tasks()
    x_spt, y_spt, x_qry, y_qry = tasks
    theta = list(maml.net.parameters())
    maml.meta_loss(*tasks)
    first_bn_input = torch.stack([F.conv2d(x, theta[0], theta[1], stride=2, padding=1) for x in x_spt])
    mean = first_bn_input.mean((1, 3, 4)).mean(0)
    var = first_bn_input.transpose(1, 2).flatten(2).var(2, unbiased=True).mean(0)
    assert torch.allclose(maml.extras.running_mean_0[0], 0.1 * mean, rtol=1e-12, atol=0)
    assert torch.allclose(maml.extras.running_var_0[0], 0.9 + 0.1 * var, rtol=1e-12, atol=0)
    for layer in (0, 1):
        assert (getattr(maml.extras, f'running_mean_{layer}') != 0).all(dim=1).all(), 'every step slot moves'
    running = [(maml.extras.running_mean_0[0], maml.extras.running_var_0[0]),
               (maml.extras.running_mean_1[0], maml.extras.running_var_1[0])]
    with torch.no_grad():
        logits = maml.predict(x_qry[0], maml.adapt(x_spt[0], y_spt[0], steps=0), steps=0)
        assert torch.allclose(logits, reference_net(x_qry[0], theta, running), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(logits, reference_net(x_qry[0], theta), rtol=1e-3)
        ref_acc = torch.stack([(reference_net(x, theta, running).argmax(-1) == y).double().mean()
                               for x, y in zip(x_qry, y_qry)]).mean()
    assert abs(maml.finetune(*tasks)[:, 0].mean().item() - ref_acc.item()) < 1e-6


def test_per_step_batch_norm_weights_are_meta_learned_not_adapted():
    maml, tasks = make(bnwb=True), make_tasks()
    weights = maml.adapt(tasks[0][0], tasks[1][0], steps=1)
    bn_weight = maml.net.names_of('bn')[0][0]
    assert torch.equal(weights[bn_weight], maml.extras.bn_weights[0][1])
    loss, _ = maml.meta_loss(*tasks)
    loss.backward()
    assert all(p.grad is not None and (p.grad.abs().sum(1) > 0).all() for p in maml.extras.bn_weights), \
        'every step slot of every batch-norm weight gets a meta-gradient'


def test_cosine_annealing_steps_inside_meta_update():
    maml, tasks = make(cosine=True, total_steps=4, min_meta_lr=1e-5), make_tasks()
    for step in (1, 2):
        maml(*tasks, track_steps=False)
        expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * step / 4)) / 2
        assert abs(maml.meta_optim.param_groups[0]['lr'] - expected) < 1e-15


def test_a_cosine_run_resumed_with_a_later_epoch_anneals_to_its_new_end():
    """--epoch 4 raised to 8 on --resume: the schedule, saved with T_max 4, must not climb again."""
    tasks, min_lr = make_tasks(), 1e-5
    first = make(cosine=True, total_steps=4, min_meta_lr=min_lr)   # what the script builds from --epoch 4
    for _ in range(4):
        first(*tasks, track_steps=False)
    assert abs(first.meta_optim.param_groups[0]['lr'] - min_lr) < 1e-12
    first.meta_optim.param_groups[0]['lr'] = 2e-4   # where a run stopped midway would be
    resumed = make(cosine=True, total_steps=8, min_meta_lr=min_lr)   # and from --epoch 8 on --resume
    resumed.load_state(first.checkpoint())
    lrs = []
    for _ in range(4):
        resumed(*tasks, track_steps=False)
        lrs.append(resumed.meta_optim.param_groups[0]['lr'])
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and abs(lrs[-1] - min_lr) < 1e-12, lrs


def test_a_cosine_schedule_shorter_than_the_run_is_refused_by_name():
    from maml.flags import make_parser, parse_args
    with pytest.raises(FlagError, match=r"--epoch 40 goes past --total_steps 30, where the --cosine schedule"):
        parse_args(make_parser('test', 'omniglot', 'data'), 'omniglot',
                   ['--epoch', '40', '--cosine', '--total_steps', '30'])


def test_mamlpp_checkpoint_round_trip_continues_identically(tmp_path):
    options = {**MAMLPP, 'update_step': STEPS, 'update_step_test': 3, 'msl_steps': 3, 'total_steps': 10}
    maml, tasks = make(**options), make_tasks()
    maml(*tasks)
    torch.save(maml.checkpoint(step=1), tmp_path / 'pp.pth')
    loaded = Meta.from_checkpoint(str(tmp_path / 'pp.pth'))
    assert loaded.hparams() == maml.hparams() and loaded.meta_steps_done == 1
    assert torch.equal(loaded.finetune(*tasks), maml.finetune(*tasks))
    for meta in (maml, loaded):
        meta(*tasks)
    state, state_loaded = maml.state_dict(), loaded.state_dict()
    assert state.keys() == state_loaded.keys() and all(torch.equal(state[k], state_loaded[k]) for k in state)
    assert maml.meta_optim.param_groups[0]['lr'] == loaded.meta_optim.param_groups[0]['lr']


def test_a_plain_maml_checkpoint_from_before_the_family_still_loads():
    maml, tasks = make(), make_tasks()
    maml(*tasks)
    old = maml.checkpoint()
    del old['family']
    old['hparams'] = {k: old['hparams'][k] for k in ('update_lr', 'meta_lr', 'update_step', 'update_step_test',
                                                      'first_order', 'grad_clip', 'amp', 'imgc', 'imgsz')}
    loaded = Meta.from_state(old)
    assert loaded.algo == 'maml' and not loaded.lslr
    assert torch.equal(loaded.finetune(*tasks), maml.finetune(*tasks))


@pytest.mark.parametrize('options, problem', [
    (dict(algo='maml2'), "not an algorithm"),
    (dict(algo='reptile', lslr=True), "reptile takes no gradient"),
    (dict(algo='metasgd', lslr=True), "drop --lslr"),
    (dict(da_steps=3, first_order=True), "--first_order forbids"),
    (dict(cosine=True), "needs --total_steps"),
])
def test_contradictory_options_are_named(options, problem):
    with pytest.raises(FlagError, match=problem):
        make(**options)


def test_the_training_flags_reach_meta_and_cosine_anneals_over_epoch():
    from maml.flags import make_parser, parse_args
    args = parse_args(make_parser('test', 'omniglot', 'data'), 'omniglot', [
        '--epoch', '40', '--algo', 'anil', '--msl_steps', '7', '--lslr', '--bnwb', '--bnrs', '--cosine',
        '--min_meta_lr', '1e-4'])
    maml = Meta(args, CONFIG, imgc=1, imgsz=SIDE)
    assert {k: maml.hparams()[k] for k in ('algo', 'msl_steps', 'da_steps', 'lslr', 'bnwb', 'bnrs', 'cosine',
                                           'min_meta_lr', 'total_steps')} == dict(
        algo='anil', msl_steps=7, da_steps=0, lslr=True, bnwb=True, bnrs=True, cosine=True, min_meta_lr=1e-4,
        total_steps=40)


def test_a_resumed_mamlpp_run_continues_exactly_as_an_uninterrupted_one(tmp_path):
    from conftest import ListLoader, fit_args

    from maml.trainer import fit
    options = {**MAMLPP, 'update_step': STEPS, 'update_step_test': 3, 'msl_steps': 3, 'total_steps': 4}

    def run(save_dir, epoch, resume=None):
        maml, loader = make(**options), ListLoader()
        args = fit_args(save_dir, epoch, resume, task_num=TASKS, eval_tasks=TASKS)
        fit(maml, loader, loader.next, lambda: maml.finetune(*loader.tasks).numpy(), args).close()
        return maml

    straight = run(tmp_path / 'straight', 4)
    run(tmp_path / 'stopped', 2)
    resumed = run(tmp_path / 'stopped', 4, resume=str(tmp_path / 'stopped' / 'last.pth'))
    assert resumed.meta_steps_done == straight.meta_steps_done == 4
    state, state_resumed = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(state[k], state_resumed[k]) for k in state)
