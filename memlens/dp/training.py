"""Train one encoder: the entry point of every training run (``memlens train``, sweeps, pipelines).

:func:`train_encoder` hands the one training loop (:func:`memlens.train.loop.train_loop`) the DP-SGD
step when the config has a ``dp`` section, and the plain step otherwise (``dp/`` builds on ``train/``,
never the reverse).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memlens import distributed as D
from memlens.config import TrainConfig
from memlens.dp.accounting import privacy_plan
from memlens.dp.secrets import read_pair_secret
from memlens.dp.step import DPStep
from memlens.errors import MemlensError
from memlens.integrity import load_private_key
from memlens.train.loop import TrainResult, train_loop
from memlens.train.run import RUN_FILE, read_run, write_run


def train_encoder(config: TrainConfig | None, out_dir: str | Path, *, pair_secret: str | Path | None = None,
                  sign_key: Any = None, **kwargs: Any) -> TrainResult:
    """Train an encoder (see :func:`_train_with_step`); with ``sign_key`` (an Ed25519 private key, or the
    path of one) the finished run record is signed."""
    result = _train_with_step(config, out_dir, pair_secret=pair_secret, **kwargs)
    if sign_key is not None and result.record.status in ("complete", "stopped_budget"):
        if D.is_main():
            key = load_private_key(sign_key) if isinstance(sign_key, (str, Path)) else sign_key
            write_run(out_dir, result.record, sign_key=key)
    return result


def _train_with_step(config: TrainConfig | None, out_dir: str | Path, *, pair_secret: str | Path | None = None,
                     **kwargs: Any) -> TrainResult:
    """Train an encoder, with DP-SGD when ``config.dp`` is set (see :func:`memlens.train.loop.train_loop`).

    With ``config=None`` and ``resume=True`` the run's own config decides. ``pair_secret``: the key file
    of a coupled pair, handed over by the command that trains both sides (:mod:`memlens.dp.secrets`);
    without it a DP run draws its own key and shares it with nobody.
    """
    cfg = config
    if cfg is None and kwargs.get("resume") and (Path(out_dir) / RUN_FILE).is_file():
        cfg = read_run(out_dir).config
    if cfg is not None and cfg.dp is not None:
        key = read_pair_secret(Path(pair_secret)) if pair_secret is not None and D.is_main() and \
            not cfg.dp.reproducible else None

        def factory(*args):
            return DPStep(*args, key=key, coupled=pair_secret is not None)

        return train_loop(config, out_dir, step_factory=factory, **kwargs)
    return train_loop(config, out_dir, **kwargs)


# Frameworks whose loss is a sum of per-example terms, and architectures without BatchNorm.
DP_FRAMEWORKS = ("mae", "supervised")


def check_feasible(config: TrainConfig, *, n: int) -> None:
    """Refuse, before any training, a DP config that cannot run: its objective or model, its delta
    (must be below 1/N) or a budget no noise level reaches.

    Raises:
        MemlensError: naming the reason.
    """
    if config.dp is None:
        return
    if config.framework not in DP_FRAMEWORKS:
        raise MemlensError(f"framework '{config.framework}' cannot be trained with DP-SGD: its loss couples the "
                           f"examples of a batch, so per-example gradients are undefined; DP-SGD supports "
                           f"{', '.join(DP_FRAMEWORKS)}")
    if config.model.arch in ("resnet9", "resnet18"):
        raise MemlensError(f"architecture '{config.model.arch}' uses BatchNorm, which mixes the examples of a batch, "
                           f"so it cannot be trained with DP-SGD; use a ViT")
    privacy_plan(config.dp, n=n, batch_size=config.batch_size, epochs=config.epochs)
