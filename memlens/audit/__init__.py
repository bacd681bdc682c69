"""The audit: SSLMem, LayerMem/ΔLayerMem, UnitMem/ClassMem and the statistical tests."""

from memlens.audit.engine import AuditResult, run_audit, write_audit
from memlens.audit.results import Audit, AuditSummary, read_audit

__all__ = ["Audit", "AuditResult", "AuditSummary", "read_audit", "run_audit", "write_audit"]
