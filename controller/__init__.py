"""``dynrt controller``: keeps a deployment's replicas at their desired state.

- ``spec``: ``deployment.yaml`` (``DeploymentSpec``), validated
- ``records``: what the controller keeps in etcd (typed records, their keys)
- ``election``: which controller is active (etcd lease), fenced writes
- ``reconcile``: pure planning — (spec, observed state, clock) → actions
- ``autoscaler``: pure — (spec, autoscaler state, load, clock) → target, decision
- ``state``: the replicas and autoscalers, changed by carrying out actions
- ``probe``: a replica's health check (NATS ping + ``/health``)
- ``launcher``: how replica processes start, are found again and are signalled
- ``controller``: the loop that wires them to etcd, NATS and HTTP
- ``main``: the ``dynrt controller [run|apply|check]`` command
"""
