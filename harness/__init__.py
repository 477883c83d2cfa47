"""The harness shared by ``tests/`` and ``benchmarks/``: whole dynrt deployments of real
processes on loopback, the clients that load them, and the checks and numbers drawn from
what they answer.

    deployment   Deployment: etcd (1 or 3 members), NATS, frontends, workers, router,
                 controller; fault injectors; teardown that leaves no process behind
    inspection   what a running deployment shows: in-flight counts, metrics, KV state
    etcd         EtcdCluster: members on loopback ports, leader lookup, kill and restart
    processes    DynrtProcess (any ``dynrt`` child), SystemPortProcess (router, controller)
    frontend     FrontendProcess: ``dynrt frontend`` on a free port, ready when it routes
    worker       WorkerProcess: ``dynrt worker``, ready once registered in etcd
    load         Load and Stream: bounded streamed chat completions with known answers
    reference    references (the uninterrupted answers), check, Report
    sse          SseStream: the JSON payloads of an OpenAI streaming response
    metrics      Prometheus text parsing
    logs         key=value / JSON log lines, migration events
    waiting      wait_for (a predicate), wait_line (a log line)
    http         get_json: a GET that tolerates a dead or stopped component
    stats        percentile

Not installed and not in the images (``.dockerignore``): it is imported from the
repository root, where ``pytest`` and ``python -m benchmarks.NAME`` run.
"""
