"""The Salamander operator: reconciles TrainingJobs into worker pods and keeps them healthy.

The decisions are pure functions (:mod:`.reconcile`, :mod:`.desired`, :mod:`.observed`);
two thin adapters apply them: :mod:`.kube` against the Kubernetes API (under kopf) and
:mod:`.local` against processes on this machine (``salamander run``).
"""
