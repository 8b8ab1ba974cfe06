"""
The machinery that the commands at the top of the repository share. The algorithm itself is
meta.py (Meta, Algorithm 2 of the paper) on learner.py's network; the two benchmark loaders are
omniglotNShot.py and MiniImagenet.py. Nothing here imports from the top level.

    trainer.py      the training loop, evaluation as mean +- 95% CI, the final test report
    flags.py        the training scripts' flags, presets and what --resume does with them
    presets.py      every setting of every experiment, and Meta's hyperparameters
    family.py       the MAML family's options (ANIL, Meta-SGD, Reptile, MAML++) and their pieces
    checkpoints.py  a run folder that loses nothing (RunDir), load_checkpoint
    distributed.py  data-parallel training under torchrun
    devices.py      the device, and the settings that make it fast
    folder.py       your own images: layouts, splits, checkpoint formats
    imagecache.py   images decoded once into a uint8 cache, and the task sampler over it
    episodes.py     seeded N-way K-shot task draws, the same on every device
    curves.py       learning curves from metrics.csv
    scratch.py      temporary files of killed processes, cleaned up
    errors.py       the problems this project names in one sentence
"""
