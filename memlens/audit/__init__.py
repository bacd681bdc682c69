"""The audit: SSLMem, LayerMem/ΔLayerMem, UnitMem/ClassMem and the statistical tests.

``memlens.audit`` is also callable: ``memlens.audit(f=..., g=..., splits=...)`` runs an audit from
Python (see :func:`memlens.audit.api.audit`).
"""

import sys
import types

from memlens.audit.api import audit
from memlens.audit.engine import AuditResult, run_audit, write_audit
from memlens.audit.results import Audit, AuditSummary, read_audit

__all__ = ["Audit", "AuditResult", "AuditSummary", "audit", "read_audit", "run_audit", "write_audit"]


class _CallableModule(types.ModuleType):
    """Lets ``memlens.audit(...)`` call :func:`audit` while ``memlens.audit`` stays this package."""

    def __call__(self, *args, **kwargs):
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
