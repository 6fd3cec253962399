"""The epgrpo reward and pruner services.

Before anything here imports torch: idle OpenMP threads sleep instead of spinning
(``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy; see protos/cpu_threads.py).
"""

from epgrpo.protos.cpu_threads import default_wait_policy as _default_wait_policy

_default_wait_policy()
