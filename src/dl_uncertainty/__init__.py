"""Uncertainty-aware deep learning: torchbnn BNNs and MC-Dropout DNNs, trained, evaluated and compared."""

import atexit
import gc

__version__ = "0.1.0"

# At exit, skip the garbage collector's walk over every object torch, MLflow and matplotlib made:
# it took about 1.3 s of each pipeline task's life. Registered first, so it runs after every other
# exit handler (MLflow's flushes included); what a cycle holds is left to the OS.
atexit.register(gc.freeze)
