"""The study: the pipeline the CLI and notebooks share (``pipeline``), the run folder (``rundir``), the command (``cli``)."""

from .pipeline import Study, Timings, format_summary, headline, make_figures, run_study, write_figures

__all__ = ["run_study", "Study", "Timings", "make_figures", "write_figures", "headline", "format_summary"]
