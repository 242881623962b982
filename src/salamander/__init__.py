"""Salamander: elastic, self-healing PyTorch training on Kubernetes.

This package holds what the operator and the worker share: the TrainingJob API
(:mod:`salamander.api`), the wire contract between them (:mod:`salamander.wire`)
and the ``salamander`` command line (:mod:`salamander.cli`).
"""

__version__ = "0.1.0"
