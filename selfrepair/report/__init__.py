"""Report: figures drawn from tables (``figures``; never runs a model) and the run report page
(``page``: ``report.html``, one self-contained page per run folder)."""

from . import figures
from .page import (FigureSpec, Section, TableSpec, build_report, register_section, report_main, sections,
                   unregister_section)

__all__ = ["figures", "build_report", "report_main", "register_section", "unregister_section", "sections",
           "FigureSpec", "TableSpec", "Section"]
