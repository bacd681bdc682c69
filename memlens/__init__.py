"""memlens: audit self-supervised vision encoders for memorization of their training data."""

__version__ = "0.1.0"


def load_encoder(run_dir):
    """The trained encoder of a run directory, in eval mode (see :func:`memlens.train.run.load_encoder`)."""
    from memlens.train.run import load_encoder as _load

    return _load(run_dir)


__all__ = ["__version__", "load_encoder"]
