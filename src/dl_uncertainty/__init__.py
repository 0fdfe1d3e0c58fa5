"""Uncertainty-aware deep learning: torchbnn BNNs and MC-Dropout DNNs, trained, evaluated and compared."""

__version__ = "0.1.0"
