"""The benchmark harness: `ppll bench` and the shared pieces of the scripts in benchmarks/.

- `models.py`: the one model registry (models, their jobs, synthetic data, the profiled split every method shares);
- `worker.py`: every measured run, one per method and framework (`python -m ppll_ext.bench.worker`), which writes
  its result as JSON; `probes.py`: what workers measure besides throughput (memory, busy time, traces);
- `driver.py`: launching workers in fresh processes and reading their JSON, run conditions, ratio tables;
- `suite.py` and `report.py`: `ppll bench` (throughput, accuracy and language-model quality; RESULTS.md).
"""
