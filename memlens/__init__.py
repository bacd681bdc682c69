"""memlens: audit self-supervised vision encoders for memorization of their training data.

``memlens.audit(f=..., g=..., splits=...)`` audits encoders from Python (see
:func:`memlens.audit.api.audit`); ``memlens.load_encoder(run_dir)`` loads a memlens run.
"""

__version__ = "0.2.0"


def load_encoder(run_dir):
    """The trained encoder of a run directory, in eval mode (see :func:`memlens.train.run.load_encoder`)."""
    from memlens.train.run import load_encoder as _load

    return _load(run_dir)


def __getattr__(name):
    # Heavy subpackages (torch, timm) load on first use, so `import memlens` stays cheap.
    if name in ("audit", "data", "models", "train", "dp", "reports", "policy"):
        import importlib

        return importlib.import_module(f"memlens.{name}")
    raise AttributeError(f"module 'memlens' has no attribute '{name}'")


__all__ = ["__version__", "load_encoder"]
