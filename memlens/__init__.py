"""memlens: audit self-supervised vision encoders for memorization of their training data.

``memlens.audit_encoders(f=..., g=..., splits=...)`` audits encoders from Python (see
:func:`memlens.audit.api.audit_encoders`); ``memlens.train_encoder(config, out_dir)``
trains one (with DP-SGD when the config says so); ``memlens.load_encoder(run_dir)`` loads a memlens run.
Both load on first use (PEP 562), so ``import memlens`` does not import torch.
"""

import importlib

from memlens.version import __version__

# name -> module that defines it: imported on first use (torch and timm take seconds to import)
_LAZY = {"audit_encoders": "memlens.audit.api", "load_encoder": "memlens.train.run",
         "train_encoder": "memlens.dp.training"}
_SUBPACKAGES = ("audit", "data", "models", "train", "dp", "reports", "policy")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"memlens.{name}")
    raise AttributeError(f"module 'memlens' has no attribute '{name}'")


__all__ = ["__version__", "audit_encoders", "load_encoder", "train_encoder"]
