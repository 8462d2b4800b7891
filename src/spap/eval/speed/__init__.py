"""Speed and memory of a pruned model against its dense base (`spap bench`).

timing.py times the two models side by side (the protocol); flops.py counts the FLOPs and
bytes that give the ideal speedups; runs.py is one run of a model; rss.py measures a run's
peak host memory in a subprocess; table.py prints a result.
"""

from .flops import count_flops, kv_cache_bytes, weight_bytes
from .table import format_table
from .timing import CPU_GRID, CUDA_GRID, Grid, bench, default_grid

__all__ = ["CPU_GRID", "CUDA_GRID", "Grid", "bench", "count_flops", "default_grid",
           "format_table", "kv_cache_bytes", "weight_bytes"]
