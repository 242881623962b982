"""In-memory snapshots of training state, protected by erasure coding across nodes.

:mod:`.snapshotter` is the API (``Snapshotter``); :mod:`.capture` says what a snapshot holds,
:mod:`.payload` how it is laid out in bytes, :mod:`.region` the double-buffered shared-memory
file, :mod:`.erasure` the XOR / Reed-Solomon code, :mod:`.plan` the pure restore decisions, and
:mod:`.persist` the background torch.distributed.checkpoint copies.
"""
