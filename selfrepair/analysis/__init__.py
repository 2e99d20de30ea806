"""Analyses of the effects: statistics (``stats``) and what the interaction ratio is made of (``decomposition``)."""
