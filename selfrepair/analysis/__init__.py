"""Analyses built on the core measurements: stability of the conclusions under meaning-preserving edits."""
