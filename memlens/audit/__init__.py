"""The audit: SSLMem, LayerMem/ΔLayerMem, UnitMem/ClassMem and the statistical tests.

``memlens.audit`` is also callable: ``memlens.audit(f=..., g=..., splits=...)`` runs an audit from
Python (see :func:`memlens.audit.api.audit`).

The names below load on first use: reading an audit (``read_audit``, what ``gate``, ``report`` and
``card`` need) does not import torch, timm or the encoders, which takes longer than the gate itself.
"""

import importlib
import sys
import types

_WHERE = {"audit": "api", "AuditResult": "engine", "run_audit": "engine", "write_audit": "engine",
          "Audit": "results", "AuditSummary": "results", "read_audit": "results", "read_signals": "signals"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"memlens.audit.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'memlens.audit' has no attribute '{name}'")


class _CallableModule(types.ModuleType):
    """Lets ``memlens.audit(...)`` call :func:`audit` while ``memlens.audit`` stays this package."""

    def __call__(self, *args, **kwargs):
        from memlens.audit.api import audit

        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
