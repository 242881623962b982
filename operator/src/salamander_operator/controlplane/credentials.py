"""Per-job credentials: only a job's own agents may speak for it.

The operator issues one random token per job (delivered to its pods in a Secret) and checks
every control-plane call against the token of the job the call claims to be from.
"""

from __future__ import annotations

import hmac
import secrets
import threading


class JobCredentials:
    """Tokens by ``(namespace, job)``. Thread safe; comparisons take constant time."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def issue(self, namespace: str, job: str) -> str:
        """The job's token, created on first use and stable after."""
        with self._lock:
            return self._tokens.setdefault((namespace, job), secrets.token_urlsafe(32))

    def set(self, namespace: str, job: str, token: str) -> None:
        """Adopt a token read back from the cluster (after an operator restart)."""
        with self._lock:
            self._tokens[(namespace, job)] = token

    def forget(self, namespace: str, job: str) -> None:
        with self._lock:
            self._tokens.pop((namespace, job), None)

    def verify(self, namespace: str, job: str, token: str | None) -> bool:
        with self._lock:
            expected = self._tokens.get((namespace, job))
        if expected is None or not token:
            return False
        return hmac.compare_digest(expected.encode(), token.encode())
