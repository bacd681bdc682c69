"""Differential privacy: the DP-SGD gradient step (ghost clipping), accounting, guarantees, pair secrets
and epsilon sweeps.

:func:`memlens.dp.training.train_encoder` is the entry point of every training run, private or not.
"""
