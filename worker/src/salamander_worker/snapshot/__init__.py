"""In-memory snapshots of training state, protected by erasure coding across nodes (issue 4,
in progress: the parity code is here; capture, shared memory and restore come next)."""
