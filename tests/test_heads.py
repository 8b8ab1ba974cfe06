"""The heads that serve any number of classes (zero, UNICORN, Proto-MAML; maml/family.py) against
independent float64 references, and what a checkpoint of each can be used for."""
import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIG, K_QRY, K_SPT, N_WAY, SIDE, TASKS, flat, rel_err
from maml.errors import FlagError
from meta import Meta

LR, STEPS = 0.25, 2


def make(head, seed=0, **options):
    torch.manual_seed(seed)
    hparams = dict(update_lr=LR, meta_lr=1e-3, update_step=STEPS, update_step_test=3, head=head)
    return Meta(CONFIG, imgc=1, imgsz=SIDE, **{**hparams, **options}).double()


def tasks_of(n_way, seed=1, tasks=TASKS):
    """`tasks` random n_way-way tasks, K_SPT support and K_QRY query images per class."""
    g = torch.Generator().manual_seed(seed)
    x_spt = torch.randn(tasks, n_way * K_SPT, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    x_qry = torch.randn(tasks, n_way * K_QRY, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    y_spt = torch.arange(n_way).repeat_interleave(K_SPT).repeat(tasks, 1)
    y_qry = torch.arange(n_way).repeat_interleave(K_QRY).repeat(tasks, 1)
    return x_spt, y_spt, x_qry, y_qry


def reference_features(x, w):
    """CONFIG's body written independently of Learner, with torch's own batch norm."""
    for i in (0, 4):
        x = F.conv2d(x, w[i], w[i + 1], stride=2, padding=1)
        x = F.relu(F.batch_norm(x, None, None, w[i + 2], w[i + 3], training=True))
    return x.flatten(1)


def reference_head(head, theta, x_spt, y_spt, n_way):
    """The head a task's inner loop starts from, as the papers define it."""
    if head == 'unicorn':
        return theta[8].repeat(n_way, 1), theta[9].repeat(n_way)
    if head == 'zero':   # leaves of their own, so that the inner steps can differentiate them
        return (torch.zeros(n_way, theta[8].shape[1], dtype=theta[8].dtype, requires_grad=True),
                torch.zeros(n_way, dtype=theta[8].dtype, requires_grad=True))
    features = reference_features(x_spt, theta)
    means = torch.stack([features[y_spt == k].mean(0) for k in range(n_way)])
    return 2 * means, -(means ** 2).sum(1)


def reference_meta_loss(head, theta, tasks, n_way, first_order):
    """Algorithm 2 task by task with autograd.grad inner steps over every weight, the head set up first.
    The inner steps take the partial derivatives of the body's weights (copies, `w + 0`), holding the
    head fixed, although the prototypes of 'proto' are a function of the same weights."""
    losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*tasks):
        fast = [w + 0 for w in theta[:8]] + list(reference_head(head, theta, x_spt, y_spt, n_way))
        for _ in range(STEPS):
            loss = F.cross_entropy(F.linear(reference_features(x_spt, fast), fast[8], fast[9]), y_spt)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - LR * g for w, g in zip(fast, grads)]
        losses.append(F.cross_entropy(F.linear(reference_features(x_qry, fast), fast[8], fast[9]), y_qry))
    return torch.stack(losses).mean()


@pytest.mark.parametrize('first_order', [False, True])
@pytest.mark.parametrize('head', ['zero', 'unicorn', 'proto'])
def test_meta_gradient_of_each_head_matches_a_per_task_reference(head, first_order):
    maml, tasks = make(head, first_order=first_order), tasks_of(N_WAY)
    learned = [p for p in maml.net.parameters() if p.requires_grad]
    assert len(learned) == (10 if head == 'unicorn' else 8), 'zero and proto heads are not meta-parameters'
    loss, _ = maml.meta_loss(*tasks)
    theta = [p.detach().clone().requires_grad_(p.requires_grad) for p in maml.net.parameters()]
    ref_loss = reference_meta_loss(head, theta, tasks, N_WAY, first_order)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    ref_grads = torch.autograd.grad(ref_loss, [t for t in theta if t.requires_grad])
    assert rel_err(flat(torch.autograd.grad(loss, learned)), flat(ref_grads)) < 1e-8


def test_unicorns_row_gets_the_sum_of_its_copies_gradients_and_moves():
    maml, tasks = make('unicorn'), tasks_of(N_WAY)
    row = maml.net.get_parameter(maml.head_names[0])
    assert row.shape == (1, 6 * 3 * 3), 'the network keeps one row, copied for every class'
    before = row.detach().clone()
    maml(*tasks)
    assert not torch.equal(before, row.detach())


@pytest.mark.parametrize('head', ['zero', 'unicorn', 'proto'])
def test_a_head_for_any_number_of_classes_serves_2_to_20_and_ignores_their_order(head):
    maml = make(head)
    for n_way in (2, 7, 20):
        tasks = tasks_of(n_way, tasks=2)
        accs = maml.finetune(*tasks, n_way=n_way)
        assert accs.shape == (2, maml.update_step_test + 1)
        order = torch.randperm(n_way, generator=torch.Generator().manual_seed(n_way))   # the classes renumbered
        renamed = (tasks[0], order[tasks[1]], tasks[2], order[tasks[3]])
        assert torch.allclose(maml.finetune(*renamed, n_way=n_way), accs, rtol=0, atol=1e-12)
        weights = maml.adapt(tasks[0][0], tasks[1][0], n_way=n_way)
        assert maml.predict(tasks[2][0], weights).shape == (n_way * K_QRY, n_way)


def test_a_learned_head_serves_at_most_its_rows_and_fewer_with_its_first_rows():
    maml = make('learned')
    with pytest.raises(FlagError, match=r"tells apart 4 classes, fewer than the 6 asked for; .*--head zero or --head proto"):
        maml.finetune(*tasks_of(6), n_way=6)
    x_spt, y_spt, x_qry, y_qry = (t[0] for t in tasks_of(2))
    weights = maml.adapt(x_spt, y_spt, n_way=2)
    logits = maml.predict(x_qry, weights)
    assert logits.shape == (2 * K_QRY, 2), 'the loss and the prediction see the first 2 rows only'
    theta = [p.detach() for p in maml.net.parameters()]
    fast = theta[:8] + [theta[8][:2], theta[9][:2]]
    for _ in range(maml.update_step_test):
        fast = [w.detach().requires_grad_() for w in fast]
        loss = F.cross_entropy(F.linear(reference_features(x_spt, fast), fast[8], fast[9]), y_spt)
        fast = [w - LR * g for w, g in zip(fast, torch.autograd.grad(loss, fast))]
    expected = F.linear(reference_features(x_qry, fast), fast[8], fast[9]).detach()
    assert torch.allclose(logits, expected, rtol=0, atol=1e-10)


def test_proto_head_before_any_step_is_the_nearest_class_mean():
    maml = make('proto')
    x_spt, y_spt, x_qry, y_qry = (t[0] for t in tasks_of(5))
    weights = maml.adapt(x_spt, y_spt, steps=0, n_way=5)
    theta = [p.detach() for p in maml.net.parameters()]
    support, query = reference_features(x_spt, theta), reference_features(x_qry, theta)
    means = torch.stack([support[y_spt == k].mean(0) for k in range(5)])
    distance = torch.cdist(query, means) ** 2   # -||f - c||^2 + ||f||^2 = 2 c.f - ||c||^2
    assert torch.allclose(maml.predict(x_qry, weights, steps=0), query.square().sum(1, keepdim=True) - distance,
                          rtol=0, atol=1e-9)


def test_a_learned_checkpoint_evaluated_with_a_proto_or_zero_head_serves_any_number_of_classes(tmp_path):
    maml = make('learned')
    maml(*tasks_of(N_WAY))
    torch.save(maml.checkpoint(), tmp_path / 'm.pth')
    for head in ('proto', 'zero'):
        loaded = Meta.from_checkpoint(str(tmp_path / 'm.pth'))
        loaded.head = head
        assert loaded.finetune(*tasks_of(9, tasks=2), n_way=9).shape == (2, 4)


@pytest.mark.parametrize('head', ['zero', 'unicorn', 'proto'])
def test_a_checkpoint_rebuilds_its_head(head, tmp_path):
    maml, tasks = make(head), tasks_of(N_WAY)
    maml(*tasks)
    torch.save(maml.checkpoint(), tmp_path / 'm.pth')
    loaded = Meta.from_checkpoint(str(tmp_path / 'm.pth'))
    assert (loaded.head, loaded.n_way, loaded.net.config[-1]) == (head, N_WAY, ('linear', [1, 6 * 3 * 3]))
    assert torch.equal(loaded.finetune(*tasks), maml.finetune(*tasks))


@pytest.mark.parametrize('options', [dict(algo='anil'), dict(algo='metasgd'), dict(lslr=True, bnwb=True, msl_steps=3),
                                     dict(algo='reptile')])
def test_the_heads_combine_with_the_family(options):
    for head in ('zero', 'proto') + (() if options.get('algo') == 'reptile' else ('unicorn',)):
        maml = make(head, **options)
        for _ in range(2):
            maml(*tasks_of(N_WAY))
        assert maml.finetune(*tasks_of(6, tasks=2), n_way=6).shape == (2, 4)


def test_combinations_that_cannot_work_are_one_sentence():
    with pytest.raises(FlagError, match=r"--head unicorn learns its row through the inner loop's gradient"):
        make('unicorn', algo='reptile')
    with pytest.raises(FlagError, match=r"--head is 'cosine', which is not a head here"):
        make('cosine')
    with pytest.raises(FlagError, match=r"--head proto sets up the network's last layer for each task"):
        Meta(CONFIG + [('relu', [])], imgc=1, imgsz=SIDE, head='proto')
