"""`make bench`: the gateway measured against the direct upstream and nginx, in one run.

Everything runs on 127.0.0.1 on free ports, out of one temporary folder; every process the bench
starts is stopped by its PID when the run ends, however it ends. `python -m bench.run --help`.
"""
