"""Run reports and plan review pages: one self-contained HTML file each (inline CSS/JS, embedded JSON, no network)."""

from __future__ import annotations

from runbook.report.model import PlanReview, RunReport
from runbook.report.observer import ReportObserver

__all__ = ["PlanReview", "ReportObserver", "RunReport"]
