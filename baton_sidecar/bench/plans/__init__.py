"""One plan module per kind of run; each returns a ``runner.Plan`` and leaves its inputs alone.

- ``compare``: every system on the identical requests (the offline, poisson, trace, prompts and
  jsonl workloads), at the workload's arrivals or at one or more offered loads, plus the ceiling.
- ``priority`` (``--scenario priority``): mixed-priority overload, preemption against FIFO.
- ``padding`` (``--scenario padding``): padding policies on the scaled Azure conversation trace.
- ``features`` (``--scenario features``): JSON schemas, ``n`` and penalties mixed in, against plain.
- ``long_prompts`` (``--scenario long-prompts``): short streams while long prompts prefill, per
  prefill policy, each against its own run of the short streams alone.
"""
