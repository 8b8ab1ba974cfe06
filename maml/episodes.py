"""
Drawing N-way K-shot tasks as index tensors, shared by the Omniglot and MiniImagenet loaders.

A split is an index_table [n_classes, max_per_class] of positions in the split's image store and
the counts [n_classes] of images per class. Tasks are drawn on the CPU, with a CPU generator,
whatever device trains: CUDA generators (Philox) and CPU ones (Mersenne Twister) give different
streams and save states of different sizes, so drawing there would make a seed mean other tasks on
a GPU and a checkpoint's sampler state unusable on the other kind of device. The index tensors of a
batch are small; `to_device` hands them to the training device without waiting for it.

    classes, support, support_y, query, query_y = draw_tasks(index_table, counts, b, n_way, k_shot,
                                                             k_query, generator)
    # every task's classes from one group (e.g. one Omniglot alphabet, as in Lake et al. 2015):
    members, sizes = group_table(alphabet_of_each_class)
    classes, ... = draw_group_tasks(index_table, counts, b, n_way, k_shot, k_query, generator, members, sizes)
    support, support_y = to_device((support, support_y), device)   # then gather where the images are
    sampler_state = generator.get_state()         # saved in a checkpoint; load with set_generator_state
"""
import torch


def _pick(scores, n, sizes):
    """n distinct random positions per row of scores [b, width], among the first sizes[b] of each
    row: slots past a row's size score -1 and are never picked while n <= size."""
    slot = torch.arange(scores.shape[-1], device=scores.device)
    return scores.masked_fill(slot >= sizes.unsqueeze(-1), -1.0).topk(n).indices


def _shuffle_within_task(flat, generator):
    """[b, n_way, k] image indices -> [b, n_way*k] in a random order per task, with their labels."""
    b, n_way, k = flat.shape
    labels = (torch.arange(n_way * k, device=flat.device) // k).expand(b, -1)
    order = torch.rand(b, n_way * k, generator=generator, device=flat.device).argsort(-1)
    return flat.reshape(b, -1).gather(1, order), labels.gather(1, order)


def draw_images(index_table, counts, classes, k_shot, k_query, generator):
    """Support and query indices and labels [b, n_way*k] of the tasks whose classes [b, n_way] are
    given (label j is classes[:, j]); support and query images are distinct drawings."""
    scores = torch.rand(*classes.shape, index_table.shape[1], generator=generator, device=classes.device)
    picked = index_table[classes.unsqueeze(-1), _pick(scores, k_shot + k_query, counts[classes])]
    support, support_y = _shuffle_within_task(picked[..., :k_shot], generator)
    query, query_y = _shuffle_within_task(picked[..., k_shot:], generator)
    return support, support_y, query, query_y


def draw_tasks(index_table, counts, num_tasks, n_way, k_shot, k_query, generator):
    """Draw tasks with tensor ops, on the device of index_table and generator (the CPU, see above).

    Returns classes [b, n_way] (label j of task t is class classes[t, j]), then support indices and
    labels [b, n_way*k_shot] and query indices and labels [b, n_way*k_query]; indices are positions
    in the split's filenames. Classes of a task are distinct, support and query images disjoint.
    """
    classes = torch.rand(num_tasks, len(counts), generator=generator, device=index_table.device).topk(n_way).indices
    return (classes, *draw_images(index_table, counts, classes, k_shot, k_query, generator))


def group_table(group_of_class):
    """The classes of each group: members [n_groups, max_size] (class positions, padded with 0) and
    sizes [n_groups], from the group label of every class (groups in order of first appearance)."""
    groups = {}
    for position, group in enumerate(group_of_class):
        groups.setdefault(group, []).append(position)
    width = max(len(g) for g in groups.values())
    members = torch.tensor([g + [0] * (width - len(g)) for g in groups.values()])
    return members, torch.tensor([len(g) for g in groups.values()])


def draw_group_tasks(index_table, counts, num_tasks, n_way, k_shot, k_query, generator, members, sizes):
    """Like draw_tasks, but all n_way classes of a task come from one group of group_table's
    members and sizes, drawn uniformly among the groups of at least n_way classes (the caller
    makes sure there is one)."""
    device = index_table.device
    group_scores = torch.rand(num_tasks, len(sizes), generator=generator, device=device)
    group = group_scores.masked_fill(sizes < n_way, -1.0).argmax(-1)
    within = _pick(torch.rand(num_tasks, members.shape[1], generator=generator, device=device), n_way, sizes[group])
    classes = members[group].gather(1, within)
    return (classes, *draw_images(index_table, counts, classes, k_shot, k_query, generator))


def to_device(tensors, device):
    """The CPU tensors of a drawn batch (integer indices and labels) on `device`. To a GPU they go
    in one copy from pinned memory with non_blocking=True, so the CPU does not wait for the GPU:
    a copy from pageable memory may wait for it to drain its queue."""
    if device.type != 'cuda':
        return tuple(t.to(device) for t in tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors]).pin_memory().to(device, non_blocking=True)
    return tuple(part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors))


def set_generator_state(generator, state, what):
    """Restore a CPU generator from a checkpoint's saved state. Runs of older versions on a GPU
    saved a CUDA generator's 16-byte state (Philox seed and offset), which no CPU generator can
    continue: the stream is then re-seeded from those 16 bytes, so the resumed run draws other (but
    still reproducible) tasks from there on, and says so."""
    if state.numel() == generator.get_state().numel():
        generator.set_state(state)
        return
    seed = int.from_bytes(bytes(state.tolist()), 'little') % (2 ** 63)
    generator.manual_seed(seed)
    print(f"note: {what} was saved by a GPU run of an older version (a {state.numel()}-byte CUDA "
          f"generator state); tasks are drawn on the CPU now, so that stream continues re-seeded from it "
          f"with other tasks than the GPU would have drawn.", flush=True)
