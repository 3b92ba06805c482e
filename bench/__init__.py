"""attnfused benchmarks.

`python -m bench` times the attention blocks (microbenchmarks, docs/contract.md §6) and
`python -m bench.e2e` a ResNet-50 with them (end to end). Results, plots and a README
per device land in `bench/results/<device>/`.

Modules: `env` (device, versions, commit), `shapes` (presets), `blocks` (the seven
blocks), `providers` (eager, compile, fused backends), `timing` (CPU and CUDA timers, host time
per call), `parity` (tolerances and the float64 check), `harness` (one row per case and provider),
`report` (table, CSV, plots, README), `progress` (bar). Run on their own: `e2e` (whole models),
`overhead` (per-call cost of each layer on CPU), `traffic` (memory traffic probe, built just in
time), `static` (the CUDA kernels' static performance check), `gpu_check` (the timed GPU check).
"""

import os as _os

# The development machines are shared: with OpenMP's default active wait, a worker thread
# that the OS has descheduled stalls every parallel region for a scheduler quantum (100x
# slowdowns measured on 2 loaded cores), which would time the load, not the kernels. Set
# before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
