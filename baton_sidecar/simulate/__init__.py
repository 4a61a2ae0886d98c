"""What-if simulation and capacity planning: the engine's scheduler on simulated time.

``baton-sidecar simulate`` (``cli.py``) runs a workload (``workload.py``) through replicas of
the engine (``replica.py``: the engine's own ``Scheduler`` with a simulated batch, ``batch.py``,
and a step cost model fitted from the bench's ``steps.json``, ``cost.py``) behind a load
balancer with optional autoscaling (``cluster.py``; round robin also replica by replica on
several processes, ``split.py``), and reports the bench's latency and throughput numbers
(``metrics.py``) and the replicas a latency target needs (``planning.py``). ``validate.py``
sets predictions against bench runs; ``speed.py`` times a million requests. See
docs/simulator.md.
"""
