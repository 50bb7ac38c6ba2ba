"""Shared test settings.

The suite runs tiny models whose ops are dominated by per-op overhead; one intra-op thread is faster for
them than two and immune to the pathological slow-downs of spinning OpenMP threads on a busy machine.
"""

import torch

torch.set_num_threads(1)
