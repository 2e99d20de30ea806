"""Analyses: self-repair (``self_repair`` driver, ``rows`` closed-form maths, ``results`` the result object),
GIM (``gim``), attributions (``attribution``), estimates vs measured effects (``estimates``), faithfulness,
the attention row made visible (``attention_row``), statistics (``stats``), what r is made of
(``decomposition``) and stability under meaning-preserving edits (``stability``)."""

from .attention_row import attention_row_data, pick_row
from .attribution import explain, head_attributions, token_attribution_table
from .common import default_baseline_id
from .context import ContextSweep, context_sweep
from .estimates import EstimateComparison, agreement, compare_estimates
from .faithfulness import faithfulness
from .gim import GIMHookError, gim, norm_freeze_hooks, tsg_pattern_grad, tsg_scores_grad
from .identity import model_hash, task_hash
from .records import Faithfulness, HeadAttributions, TableResult, TokenAttributions
from .results import SelfRepairResult, read_result_info
from .rows import ABLATIONS, MAX_K, SELECT_MODES, VALUE_ABLATIONS, interaction_ratio, local_effects, select_keys
from .self_repair import analyze_self_repair

__all__ = ["analyze_self_repair", "SelfRepairResult", "read_result_info", "local_effects", "select_keys",
           "interaction_ratio", "ABLATIONS", "VALUE_ABLATIONS", "SELECT_MODES", "MAX_K", "gim", "GIMHookError",
           "norm_freeze_hooks", "tsg_scores_grad", "tsg_pattern_grad", "explain", "head_attributions",
           "token_attribution_table", "default_baseline_id", "compare_estimates", "EstimateComparison", "agreement",
           "faithfulness", "attention_row_data", "pick_row", "model_hash", "task_hash", "TokenAttributions",
           "HeadAttributions", "Faithfulness", "TableResult", "context_sweep", "ContextSweep"]
