"""The run report: ``report.html``, one self-contained page per run folder (see :mod:`selfrepair.report.page`)."""

from .page import (FigureSpec, Section, TableSpec, build_report, register_section, report_main, sections,
                   unregister_section)

__all__ = ["build_report", "report_main", "register_section", "unregister_section", "sections", "FigureSpec",
           "TableSpec", "Section"]
