"""spap: one-shot structured pruning of LLM MLPs by SPAP (Hu & Yuan, arXiv 2505.03373).

    import spap
    result = spap.prune(model, tokenizer, sparsity=0.3)
    spap.save_pruned(result.model, tokenizer, "out", result.report)
"""

from .api import PruneResult, prune
from .errors import SpapError
from .export import save_pruned
from .loading import load_model

__version__ = "0.1.0"
__all__ = ["PruneResult", "SpapError", "load_model", "prune", "save_pruned", "__version__"]
