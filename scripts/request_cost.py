#!/usr/bin/env python3
"""What one request of each kind a StreamConsumer brings costs the API server, in CPU (issue 16).

Against a running local control plane (`make cluster-up`, the CRDs applied) with nothing else
busy: N requests of one kind at a time from 8 threads (as scripts/bench_scale.py creates), and
the CPU time kube-apiserver and etcd used meanwhile (bench_scale's `cpu_seconds`, read 2 s after
the last answer), per request. No operator runs: only these requests. Diagnostic; asserts
nothing.

    python3 scripts/request_cost.py [N]          (default 1000; .dev/cluster of this checkout)
"""
import copy
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale as b  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".dev", "cluster")
PROCESSES = ("kube-apiserver", "etcd")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    server = open(os.path.join(ROOT, "kubeconfig")).read().split("server: ")[1].split()[0]
    api = b.Api(server, os.path.join(ROOT, "pki"))
    ns = f"request-cost-{int(time.time())}"
    api.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    name = lambda i: f"sc-{i:04d}"  # noqa: E731

    def run(label, one):
        time.sleep(2)
        before = b.cpu_seconds()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(n)))
        time.sleep(2)
        after = b.cpu_seconds()
        costs = "  ".join(f"{p} {1000 * (after[p] - before[p]) / n:5.1f} ms" for p in PROCESSES)
        print(f"{label:<40} {costs}", flush=True)

    status = {
        "observedGeneration": 1, "replicas": 1, "readyReplicas": 0, "phase": "Running",
        "configHash": "9841fadd84d52f89",
        "selector": "app.kubernetes.io/instance=sc,app.kubernetes.io/name=streamops-worker",
        "lag": {"maxPartitionLag": 0, "members": 0, "observedAt": "2026-12-02T16:24:40Z",
                "partitions": 1, "total": 0},
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": m, "observedGeneration": 1,
             "lastTransitionTime": "2026-12-02T16:22:43Z"}
            for t, s, r, m in [
                ("Ready", "False", "WorkersNotReady", "0/1 workers ready"),
                ("Progressing", "True", "RollingOut", "the workers are rolling out"),
                ("Degraded", "False", "AsExpected", ""),
                ("LagAvailable", "True", "LagRead", "the consumer-group lag is read from the brokers"),
            ]
        ],
    }

    def apply_status(st):
        body = json.dumps({"apiVersion": f"{b.GROUP}/{b.VERSION}", "kind": "StreamConsumer", "status": st}).encode()
        return lambda i: api.request(
            "PATCH", b.sc_path(ns, name(i)) + "/status?fieldManager=streamops-operator&force=true",
            body, content_type="application/apply-patch+yaml")

    ready = copy.deepcopy(status)
    ready["readyReplicas"] = 1
    ready["conditions"][0].update(status="True", reason="WorkersReady", message="1/1 workers ready")
    run("POST streamconsumers", lambda i: api.request("POST", b.sc_path(ns), b.stream_consumer(ns, name(i), "cost", "127.0.0.1:9092")))
    run("APPLY streamconsumers/status (first)", apply_status(status))
    run("APPLY streamconsumers/status (change)", apply_status(ready))
    one_field = json.dumps({"status": {"lag": {"observedAt": "2026-12-02T17:01:00Z"}}}).encode()
    run("merge PATCH streamconsumers/status", lambda i: api.request(
        "PATCH", b.sc_path(ns, name(i)) + "/status?fieldManager=streamops-operator", one_field,
        content_type="application/merge-patch+json"))
    finalizer = json.dumps([{"op": "add", "path": "/metadata/finalizers", "value": ["streamops.dev/cleanup"]}]).encode()
    run("JSON PATCH streamconsumers (finalizer)", lambda i: api.request(
        "PATCH", b.sc_path(ns, name(i)), finalizer, content_type="application/json-patch+json"))
    run("GET streamconsumers", lambda i: api.get(b.sc_path(ns, name(i))))
    run("POST configmaps", lambda i: api.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {
        "metadata": {"name": f"{name(i)}-config"}, "data": {"worker.yaml": "x: " + "y" * 1200}}))
    run("POST events", lambda i: api.request("POST", f"/apis/events.k8s.io/v1/namespaces/{ns}/events", {
        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"generateName": "sc-"},
        "eventTime": "2026-12-02T17:00:00.000000Z", "reportingController": "streamops-operator",
        "reportingInstance": "request-cost", "action": "Create", "reason": "Created", "type": "Normal",
        "note": "created the workers",
        "regarding": {"apiVersion": f"{b.GROUP}/{b.VERSION}", "kind": "StreamConsumer", "name": name(i), "namespace": ns}}))
    api.request("DELETE", f"/api/v1/namespaces/{ns}", ok=(200, 202))


if __name__ == "__main__":
    main()
