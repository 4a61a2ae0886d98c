"""Kubernetes operator for Baton: BatonDeployment and BatonPolicy custom resources (group baton.dev).

Importing the package registers the kopf handlers, so both ``kopf run -m baton_operator`` and
``kopf run operator/baton_operator/main.py`` work. The pure parts (``policy``, ``resources``,
``configmap``, ``injection``, ``status``, the ``rollout`` package) import nothing from kopf.
"""

from baton_operator import handlers as handlers  # noqa: F401  (registers the kopf handlers)
from baton_operator import rollout_controller as rollout_controller  # noqa: F401  (the rollout daemon)
