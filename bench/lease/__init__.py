"""The GPU lease check (``bench/lease_check.sh``): one command that fits one short call on a GPU machine.

Modules: :mod:`rows` (measured rows, each appended the moment it is measured), :mod:`env_setup` (step a),
:mod:`ratios` (step c), :mod:`sanitize_ops` (step d), :mod:`fill` (step e), :mod:`summary` (summary.md /
summary.json), :mod:`triton_probe` (Triton cache hits and misses), :mod:`per_test_timeout` (the per-test time limit
of steps b and e2 where pytest-timeout is not installed), :mod:`aot` (Triton kernels compiled ahead of time, used by
``bench/lease_prebuild.py``).
"""
