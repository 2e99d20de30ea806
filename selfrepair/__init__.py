"""selfrepair: self-repair inside attention, measured by ablation and estimated with GIM gradients.

model + task -> cached run -> effects -> DataFrames -> figures:

* ``load_model``         (loading)      a TransformerLens model, offline by default
* ``probe``              (probe)        which hook sites of this model are live
* ``tasks``, ``Task``    (tasks)        prompts with answer / wrong tokens and a metric
* ``cached_run``         (cache)        one forward + backward: scores, pattern, values, dm/dz
* ``analyze_self_repair``(self_repair)  individual vs joint ablations, local and global
* ``measure_z_edits``    (ablation)     batched global ablations with partial recomputation
* ``gim``                (gim)          GIM backward modifications as a context manager
* ``explain``, ``head_attributions``, ``compare_estimates``, ``faithfulness`` (attribution)
* ``plots``              (plots)        plotly figures
"""

__version__ = "0.1.0"

from . import tasks
from .tasks import Task
from .loading import load_model
from .probe import Backend, probe
from .cache import CachedRun, cached_run
from .ablation import ZEdits, measure_z_edits, prepare_clean
from .self_repair import SelfRepairResult, analyze_self_repair
from .gim import gim
from .attribution import compare_estimates, explain, faithfulness, head_attributions

__all__ = [
    "tasks", "Task", "load_model", "Backend", "probe", "CachedRun", "cached_run", "ZEdits",
    "measure_z_edits", "prepare_clean", "SelfRepairResult", "analyze_self_repair", "gim",
    "compare_estimates", "explain", "faithfulness", "head_attributions",
]
