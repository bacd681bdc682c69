"""Linear probe: logistic regression on frozen features, the papers' downstream utility measure."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel

from memlens import resources
from memlens.data import Dataset, Splits, load
from memlens.data.augment import EvalTransform
from memlens.data.loader import Unit, eval_batches
from memlens.errors import MemlensError
from memlens.train.run import load_encoder, read_run, write_run


class ProbeResult(BaseModel):
    accuracy: float
    n_train: int
    n_test: int
    train_set: str
    test_set: str
    feature_dim: int
    seconds: float


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: Dataset, rows: np.ndarray, *, mean: list[float],
                     std: list[float], size: int, evaluation: EvalTransform, workers: int = 0,
                     batch_size: int = 512) -> np.ndarray:
    """Probe features (N, F) float32 of the un-augmented images of ``rows`` (the encoder's eval input)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    units = [Unit(rows[k:k + batch_size]) for k in range(0, len(rows), batch_size)]
    out = []
    for got in eval_batches(dataset.pixels, units, size=size, evaluation=evaluation, device=torch.device("cpu"),
                            workers=workers):
        if got.bad:
            raise MemlensError(next(iter(got.bad.values())))
        out.append(encoder.probe_features(encoder.forward_features((got.images - m) / s)).numpy())
    return np.concatenate(out)


def probe_sets(dataset: Dataset, splits: Splits | None, *, seed: int, max_train: int,
               max_test: int) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Probe training rows (S_S when splits exist, shared by f and g, so their probes are comparable)
    and test rows (the test part, else S_E, else a held-out fifth of the training part)."""
    rng = np.random.default_rng(seed)
    if splits is not None:
        train_rows, train_name = dataset.indices(splits.subsets["S_S"]), "S_S"
    else:
        train_rows, train_name = dataset.part_indices("train"), "training part"
    if dataset.has_test_part:
        test_rows, test_name = dataset.part_indices("test"), "test part"
    elif splits is not None:
        test_rows, test_name = dataset.indices(splits.subsets["S_E"]), "S_E"
    else:
        perm = rng.permutation(train_rows)
        cut = max(1, len(perm) // 5)
        test_rows, train_rows = perm[:cut], perm[cut:]
        test_name, train_name = "held-out fifth of the training part", "rest of the training part"
    if len(train_rows) > max_train:
        train_rows = np.sort(rng.choice(train_rows, max_train, replace=False))
        train_name += f" (random {max_train})"
    if len(test_rows) > max_test:
        test_rows = np.sort(rng.choice(test_rows, max_test, replace=False))
        test_name += f" (random {max_test})"
    return train_rows, test_rows, train_name, test_name


def linear_probe(encoder: nn.Module, dataset: Dataset, *, splits: Splits | None = None, seed: int = 0,
                 max_train: int = 5000, max_test: int = 5000) -> ProbeResult:
    """Fit a multinomial logistic regression on standardised frozen features and report test accuracy."""
    # sklearn: optional or slow to import, loaded only on this path
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if dataset.labels is None:
        raise MemlensError(f"the linear probe needs labels; {dataset.source} has none")
    t0 = time.perf_counter()
    train_rows, test_rows, train_name, test_name = probe_sets(dataset, splits, seed=seed, max_train=max_train,
                                                              max_test=max_test)
    mean, std = encoder.normalization
    rec = encoder.record
    size = rec.data["image_size"]
    kw = dict(mean=mean, std=std, size=size, evaluation=EvalTransform(size, **(rec.data.get("eval_transform") or {})),
              workers=resources.plan(lazy=dataset.lazy).workers)
    x_train = extract_features(encoder, dataset, train_rows, **kw)
    x_test = extract_features(encoder, dataset, test_rows, **kw)
    y_train, y_test = dataset.labels[train_rows], dataset.labels[test_rows]
    if len(np.unique(y_train)) < 2:
        raise MemlensError("the probe's training set holds a single class")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    clf.fit(x_train, y_train)
    acc = float((clf.predict(x_test) == y_test).mean())
    return ProbeResult(accuracy=round(acc, 6), n_train=len(train_rows), n_test=len(test_rows), train_set=train_name,
                       test_set=test_name, feature_dim=int(x_train.shape[1]),
                       seconds=round(time.perf_counter() - t0, 3))


def probe_run(run_dir: str | Path, *, cache_dir: str | Path | None = None, dataset: Dataset | None = None,
              max_train: int = 5000, max_test: int = 5000, sign_key=None) -> ProbeResult:
    """Probe a run's encoder and store the result in its ``run.json`` (signed again with ``sign_key``: a
    signed record rewritten without its key would lose its signature)."""
    record = read_run(run_dir)
    encoder = load_encoder(run_dir)
    dataset = dataset if dataset is not None else load(record.config.data, cache_dir=cache_dir)
    if dataset.fingerprint != record.data["fingerprint"]:
        raise MemlensError(f"the data of {run_dir} has changed since training (fingerprint mismatch)")
    splits = Splits.load(record.config.splits, dataset) if record.config.splits else None
    result = linear_probe(encoder, dataset, splits=splits, seed=record.config.seed, max_train=max_train,
                          max_test=max_test)
    record = read_run(run_dir)
    record.probe = result.model_dump()
    write_run(run_dir, record, sign_key=sign_key)
    return result
