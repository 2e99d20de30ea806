"""selfrepair: self-repair inside attention, measured by ablation and estimated with GIM gradients.

model + task -> cached run -> effects -> tables -> figures, one subpackage per arrow
(docs/architecture.md):

* ``load_model``, ``probe``                       (models)    a TransformerLens model; its live hook sites
* ``tasks``, ``Task``                             (tasks)     prompts with answer / wrong tokens and a metric
* ``cached_run``, ``measure_z_edits``             (engine)    one forward + backward; batched z edits
* ``analyze_self_repair``, ``gim``, ``explain``, ``head_attributions``, ``compare_estimates``,
  ``faithfulness``                                (analysis)  result objects with to_frame / save / load
* ``plots``                                       (report)    plotly figures from tables
* ``study``                                       (study)     the pipeline the CLI and notebooks share
"""

from ._version import __version__
from . import tasks
from .tasks import Task
from .models import Backend, load_model, probe
from .engine import CachedRun, ZEdits, cached_run, measure_z_edits, prepare_clean
from .analysis import (EstimateComparison, SelfRepairResult, analyze_self_repair, compare_estimates, explain,
                       faithfulness, gim, head_attributions)
from .report import figures as plots

__all__ = [
    "__version__", "tasks", "Task", "load_model", "Backend", "probe", "CachedRun", "cached_run", "ZEdits",
    "measure_z_edits", "prepare_clean", "SelfRepairResult", "analyze_self_repair", "gim", "compare_estimates",
    "EstimateComparison", "explain", "faithfulness", "head_attributions", "plots",
]
