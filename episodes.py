"""
Drawing N-way K-shot tasks as index tensors, shared by the Omniglot and MiniImagenet loaders.

A split is an index_table [n_classes, max_per_class] of positions in the split's image store and
the counts [n_classes] of images per class. Everything happens with tensor ops on the device of
the table and generator: no host sync, so the draw can run ahead of the GPU like any other kernel.
"""
import torch


def _shuffle_within_task(flat, generator):
    """[b, n_way, k] image indices -> [b, n_way*k] in a random order per task, with their labels."""
    b, n_way, k = flat.shape
    labels = (torch.arange(n_way * k, device=flat.device) // k).expand(b, -1)
    order = torch.rand(b, n_way * k, generator=generator, device=flat.device).argsort(-1)
    return flat.reshape(b, -1).gather(1, order), labels.gather(1, order)


def draw_tasks(index_table, counts, num_tasks, n_way, k_shot, k_query, generator):
    """Draw tasks with tensor ops only (no host sync), on the device of index_table and generator.

    Returns classes [b, n_way] (label j of task t is class classes[t, j]), then support indices and
    labels [b, n_way*k_shot] and query indices and labels [b, n_way*k_query]; indices are positions
    in the split's filenames. Classes of a task are distinct, support and query images disjoint.
    """
    device = index_table.device
    classes = torch.rand(num_tasks, len(counts), generator=generator, device=device).topk(n_way).indices
    # a random score per image slot; slots past a smaller class's count score -1 and are never picked
    scores = torch.rand(num_tasks, n_way, index_table.shape[1], generator=generator, device=device)
    slot = torch.arange(index_table.shape[1], device=device)
    scores = scores.masked_fill(slot >= counts[classes].unsqueeze(-1), -1.0)
    picked = index_table[classes.unsqueeze(-1), scores.topk(k_shot + k_query).indices]
    support, support_y = _shuffle_within_task(picked[..., :k_shot], generator)
    query, query_y = _shuffle_within_task(picked[..., k_shot:], generator)
    return classes, support, support_y, query, query_y
