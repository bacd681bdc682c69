"""Pydantic models for every file a user writes, one module per concern.

* :mod:`memlens.config.base`: the strict base model, YAML reading, validation errors, epsilons;
* :mod:`memlens.config.data`: data sources and splits;
* :mod:`memlens.config.train`: training recipes (models, objectives, DP-SGD, references);
* :mod:`memlens.config.audit`: audits (encoders, views, units, privacy, inference);
* :mod:`memlens.config.runs`: sweeps and pipelines.

Everything is importable from ``memlens.config`` directly.
"""

from memlens.config.audit import *  # noqa: F401,F403
from memlens.config.base import *  # noqa: F401,F403
from memlens.config.base import _count, _model_at  # noqa: F401
from memlens.config.data import *  # noqa: F401,F403
from memlens.config.runs import *  # noqa: F401,F403
from memlens.config.train import *  # noqa: F401,F403
