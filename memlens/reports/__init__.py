"""Reports: HTML and PDF compliance reports of audits."""

from memlens.reports.render import ReportResult, build_context, render_html, render_report

__all__ = ["ReportResult", "build_context", "render_html", "render_report"]
