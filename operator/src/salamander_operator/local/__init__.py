"""The local runtime: ``salamander run`` plays the part of Kubernetes on one machine.

Each worker "pod" is a ``salamander-worker`` agent process (with its training processes)
on its own loopback address, and :func:`salamander_operator.reconcile.reconcile` decides,
exactly as it does in the cluster.
"""

from salamander_operator.local.runner import LocalRun, RunOutcome, run_manifest

__all__ = ["LocalRun", "RunOutcome", "run_manifest"]
