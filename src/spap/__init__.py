"""spap: one-shot structured pruning of LLM MLPs by SPAP (Hu & Yuan, arXiv 2505.03373).

    import spap
    result = spap.prune(model, tokenizer, sparsity=0.3)
    spap.save_pruned(result.model, tokenizer, "out", result.report)

    # or from a checkpoint to a folder, resumable, one layer in memory with low_memory=True
    spap.prune_to_disk("path/to/model", "out", sparsity=0.3, low_memory=True)
"""

from .api import JobResult, PruneResult, prune, prune_to_disk
from .config import PruneConfig
from .errors import SpapError
from .modelio.export import save_pruned
from .modelio.loading import load_model
from .solvers import list_options as options

__version__ = "0.1.0"
__all__ = ["JobResult", "PruneConfig", "PruneResult", "SpapError", "load_model", "options",
           "prune", "prune_to_disk", "save_pruned", "__version__"]
