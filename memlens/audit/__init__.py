"""The audit: SSLMem, LayerMem/ΔLayerMem, UnitMem/ClassMem, membership inference, empirical privacy and
the statistical tests.

The names below load on first use (PEP 562): reading an audit (``read_audit``, what ``gate``,
``report`` and ``card`` need) does not import torch, timm or the encoders, which takes longer than the
gate itself. memlens's own modules import from the defining module instead (tests/test_architecture.py).
"""

import importlib

_WHERE = {"audit_encoders": "api", "AuditResult": "results", "run_audit": "engine", "write_audit": "results",
          "Audit": "results", "AuditSummary": "results", "read_audit": "results", "read_signals": "results"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"memlens.audit.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'memlens.audit' has no attribute '{name}'")
