#!/usr/bin/env python3
"""Scale bench driver (issue 16), run by scripts/bench-scale.sh once the control plane, kwok's
binary, the chart's RBAC and the operator's release binary are in place.

For each size N (default 100, 500, 1000): N StreamConsumers across 20 namespaces, two operator
replicas with leader election (the chart's ServiceAccount, a TokenRequest token), kwok faking the
worker pods' readiness on one fake Node. Measured:

- converge: seconds from the first create until every StreamConsumer has
  status.observedGeneration == metadata.generation and Ready=True;
- the leader's peak RSS (VmHWM from /proc/<pid>/status) once converged;
- API requests per StreamConsumer made by the operator during that time: the delta of the
  apiserver's apiserver_flowcontrol_dispatched_requests_total for the `service-accounts` flow
  schema. Only the operators authenticate as a ServiceAccount outside kube-system (the bench and
  kwok use the admin certificate, which is `exempt`; the controller manager's controllers use
  kube-system ServiceAccounts, `kube-system-service-accounts`), so this counts exactly the
  operators' requests, lease renewals of both replicas included. The whole apiserver's
  apiserver_request_total delta per StreamConsumer is printed beside it for scale;
- fail-over: SIGKILL of the leader, then a spec change of one StreamConsumer; seconds until the
  other replica holds the Lease, and until that change is reconciled (observedGeneration caught up
  and Ready).

- floor (unless --no-floor): before the operators start, the same control plane makes N bare
  worker Deployments Ready in the same namespaces, with no operator at all (one replica each, the
  resources the StreamConsumers ask for, created by the same 8 threads): seconds until every one
  has observedGeneration == generation and one ready replica, and apiserver requests per
  Deployment. That is the controller manager's Deployment -> ReplicaSet -> Pod chain, the
  scheduler and kwok alone; `converge / floor` is the operator's share, a ratio measured in one
  run, which a noisy machine moves far less than either time.

Prints a table; asserts nothing (targets are stated beside the figures). Standard library only.
Every process it starts is stopped by pid at exit; namespaces it made are deleted.
"""

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

GROUP = "streamops.dev"
VERSION = "v1alpha1"
RUN_LABEL = "streamops.dev/scale-bench"
NODE_NAME = "kwok-scale-bench"
TOPIC = "streamops-scale-bench"


def log(msg):
    print(f"bench-scale: {msg}", file=sys.stderr, flush=True)


class Api:
    """A minimal Kubernetes API client over the admin client certificate (one connection per
    thread)."""

    def __init__(self, server, pki):
        host_port = server.removeprefix("https://")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.ctx = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
        self.ctx.load_cert_chain(os.path.join(pki, "admin.crt"), os.path.join(pki, "admin.key"))
        self.local = threading.local()

    def _conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=60)
            self.local.conn = c
        return c

    def request(self, method, path, body=None, content_type="application/json", ok=(200, 201)):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(3):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.2)
                continue
            if resp.status not in ok:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {raw[:400]!r}")
            if resp.headers.get("Content-Type", "").startswith("application/json"):
                return resp.status, json.loads(raw)
            return resp.status, raw.decode()
        raise RuntimeError("unreachable")

    def get(self, path, ok=(200,)):
        return self.request("GET", path, ok=ok)[1]


def sc_path(ns=None, name=None):
    base = f"/apis/{GROUP}/{VERSION}"
    if ns is None:
        return f"{base}/streamconsumers"
    p = f"{base}/namespaces/{ns}/streamconsumers"
    return p if name is None else f"{p}/{name}"


def stream_consumer(ns, name, run_id, brokers):
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "StreamConsumer",
        "metadata": {"name": name, "namespace": ns, "labels": {RUN_LABEL: run_id}},
        "spec": {
            "replicas": 1,
            "kafka": {
                "bootstrapServers": brokers,
                "topics": [TOPIC],
                "groupId": f"scale-{ns}-{name}",
                "autoOffsetReset": "earliest",
            },
            "handler": {"kind": "moving-average", "movingAverage": {"window": 5}},
            "sink": {"postgres": {"urlSecretRef": {"name": "bench-postgres", "key": "url"}}},
            "batch": {"maxMessages": 500, "maxWaitMs": 200},
            # Retain: deleting the bench's objects must not touch the shared broker's groups.
            "cleanupPolicy": "Retain",
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
        },
    }


def parse_metrics(text):
    """{(name, frozenset(labels)): value} of counters in the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        try:
            head, value = line.rsplit(" ", 1)
            v = float(value)
        except ValueError:
            continue
        if "{" in head:
            name, rest = head.split("{", 1)
            labels = {}
            for part in rest.rstrip("}").split('",'):
                if "=" in part:
                    k, val = part.split("=", 1)
                    labels[k.strip(",")] = val.strip('"')
        else:
            name, labels = head, {}
        out[(name, frozenset(labels.items()))] = v
    return out


def counter_sum(metrics, name, **match):
    return sum(
        v
        for (n, labels), v in metrics.items()
        if n == name and all((k, want) in labels for k, want in match.items())
    )


def counts(m, lease_flow_schema=None):
    """(the operators' requests, every request) so far, from parsed apiserver metrics `m`. The
    operators' Lease requests go through the chart's FlowSchema `<release>-operator-leader-election`
    (leader-election priority level), the rest through `service-accounts`."""
    metric = "apiserver_flowcontrol_dispatched_requests_total"
    operator = counter_sum(m, metric, flow_schema="service-accounts")
    if lease_flow_schema:
        operator += counter_sum(m, metric, flow_schema=lease_flow_schema)
    total = counter_sum(m, "apiserver_request_total")
    return operator, total


def request_counts(api, lease_flow_schema=None):
    """`counts` as of now."""
    return counts(parse_metrics(api.get("/metrics")), lease_flow_schema)


def snapshot(api, lease_flow_schema=None, operator_pids=()):
    """One read of the apiserver's metrics (a large page, read once): the operators' requests, every
    request, and the profile `profile_delta` compares (requests by verb and resource, and each
    process's CPU seconds)."""
    m = parse_metrics(api.get("/metrics"))
    operator, total = counts(m, lease_flow_schema)
    return operator, total, (request_profile(m), cpu_seconds(operator_pids))


def request_profile(m):
    """{(verb, resource): [requests, seconds]} from the apiserver's request counters and latency
    sums in parsed metrics `m` (long-running WATCH and CONNECT left out), for a breakdown of where
    its time goes."""
    out = {}
    for (n, labels), v in m.items():
        if n not in ("apiserver_request_total", "apiserver_request_duration_seconds_sum"):
            continue
        d = dict(labels)
        verb = d.get("verb", "?")
        if verb in ("WATCH", "CONNECT"):
            continue
        key = (verb, d.get("resource", "?") + ("/" + d["subresource"] if d.get("subresource") else ""))
        slot = out.setdefault(key, [0.0, 0.0])
        slot[0 if n == "apiserver_request_total" else 1] += v
    return out


def cpu_seconds(operator_pids=()):
    """{process name: CPU seconds so far} of the control plane's and kwok's processes, of the dev
    stack's Kafka broker (`broker`: the operators read lag from it), and of the operators
    (`operator_pids`, whatever their binary is called), from user + system time in
    /proc/<pid>/stat, summed by name."""
    names = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")
    operators = {str(p) for p in operator_pids}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        name = "operators" if pid in operators else next((x for x in names if comm.startswith(x[:15])), None)
        if name is None and comm == "java":
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"kafka.Kafka" in f.read():
                        name = "broker"
            except OSError:
                pass
        if name is None:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def profile_delta(before, after, n, label):
    """Logs what the apiserver spent (requests and seconds per object, top verbs and resources) and
    each process's CPU seconds between two snapshots; returns it for the figures."""
    (req0, cpu0), (req1, cpu1) = before, after
    rows = []
    for key, (c1, s1) in req1.items():
        c0, s0 = req0.get(key, (0.0, 0.0))
        if c1 - c0 > 0:
            rows.append((s1 - s0, c1 - c0, key))
    rows.sort(reverse=True)
    cpu = {k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 1) for k in cpu1}
    log(f"{label}: CPU seconds by process: {json.dumps(cpu)}")
    for secs, count, (verb, res) in rows[:12]:
        log(f"{label}:   {verb:6} {res:40} {count / n:6.2f} req/object  {secs:7.1f} s in all  "
            f"{1000 * secs / count:6.1f} ms/req")
    return {"cpu_s": cpu, "top": [[v, r, round(c / n, 2), round(s, 1)] for s, c, (v, r) in rows[:12]]}


def lease_requests(api, lease_flow_schema):
    """Requests dispatched through the chart's leader-election FlowSchema, by priority level."""
    m = parse_metrics(api.get("/metrics"))
    out = {}
    for (n, labels), v in m.items():
        if n == "apiserver_flowcontrol_dispatched_requests_total" and ("flow_schema", lease_flow_schema) in labels:
            level = dict(labels).get("priority_level", "?")
            out[level] = out.get(level, 0) + v
    return out


def vm_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def converged(sc):
    st = sc.get("status") or {}
    if st.get("observedGeneration") != sc["metadata"].get("generation"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


class Operator:
    def __init__(self, args, name, kubeconfig, port, brokers_json):
        self.name = name
        self.port = port
        self.log_path = os.path.join(args.work, f"{name}.log")
        env = dict(os.environ)
        for k in ("WATCH_NAMESPACE", "STREAMOPS_LEADER_ELECTION", "RUST_LOG"):
            env.pop(k, None)
        env.update(
            KUBECONFIG=kubeconfig,
            POD_NAMESPACE=args.system_ns,
            POD_NAME=name,
            RUST_LOG="info",
            STREAMOPS_LAG_BROKERS=brokers_json,
        )
        cmd = [
            args.operator_bin,
            "run",
            "--log-format=text",
            f"--metrics-listen=127.0.0.1:{port}",
            f"--lease-name={args.lease}",
            "--leader-election=true",
            f"--lag-interval={args.lag_interval}",
        ]
        self.logf = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf)
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.logf.close()


def lease_holder(api, ns, lease):
    try:
        lease_obj = api.get(f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{lease}")
    except RuntimeError:
        return None
    return (lease_obj.get("spec") or {}).get("holderIdentity")


def wait_until(what, timeout, f, interval=0.25):
    deadline = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def token_kubeconfig(args, path):
    token = subprocess.run(
        [args.kubectl, "--kubeconfig", args.kubeconfig, "create", "token", args.service_account,
         "-n", args.system_ns, "--duration=2h"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    ca = base64.b64encode(open(os.path.join(args.pki, "ca.crt"), "rb").read()).decode()
    with open(path, "w") as f:
        f.write(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n"
            f"    server: {args.server}\n    certificate-authority-data: {ca}\n"
            f"users:\n- name: sa\n  user:\n    token: {token}\n"
            f"contexts:\n- name: sa\n  context:\n    cluster: local\n    user: sa\n    namespace: {args.system_ns}\n"
            "current-context: sa\n"
        )
    os.chmod(path, 0o600)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delete_namespaces(api, names, timeout):
    for ns in names:
        api.request("DELETE", f"/api/v1/namespaces/{ns}", ok=(200, 202, 404))

    def gone():
        left = [ns for ns in names if api.request("GET", f"/api/v1/namespaces/{ns}", ok=(200, 404))[0] == 200]
        return not left

    try:
        wait_until(f"namespaces {names[0]}.. to be deleted", timeout, gone, interval=1.0)
    except TimeoutError as e:
        log(f"warning: {e}")


def stage_breakdown(api, run_id, label):
    """Where each StreamConsumer's time went, from the objects' own timestamps (1 s resolution):
    operator (created -> its Deployment created), control plane (Deployment created -> Available),
    operator again (Available -> the StreamConsumer Ready). Logs percentiles, and when the last of
    each stage finished (seconds after the first StreamConsumer's creationTimestamp, so every figure
    comes from the same clock). Diagnostic only."""
    from datetime import datetime

    def ts(s):
        return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").timestamp() if s else None

    def cond(obj, kind):
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c.get("type") == kind and c.get("status") == "True":
                return ts(c.get("lastTransitionTime"))
        return None

    scs = api.get(sc_path() + f"?labelSelector={RUN_LABEL}%3D{run_id}")["items"]
    deps = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d
        for d in api.get("/apis/apps/v1/deployments?labelSelector=app.kubernetes.io%2Fmanaged-by%3Dstreamops-operator")["items"]
    }
    first = min((ts(sc["metadata"].get("creationTimestamp")) for sc in scs), default=None)
    stages = {"sc->deployment": [], "deployment->available": [], "available->ready": []}
    last = {"deployment created": [], "available": [], "ready": []}
    for sc in scs:
        m = sc["metadata"]
        d = deps.get((m["namespace"], m["name"]))
        t_sc, t_ready = ts(m.get("creationTimestamp")), cond(sc, "Ready")
        t_dep = ts(d["metadata"].get("creationTimestamp")) if d else None
        t_av = cond(d, "Available") if d else None
        if None in (t_sc, t_ready, t_dep, t_av):
            continue
        stages["sc->deployment"].append(t_dep - t_sc)
        stages["deployment->available"].append(t_av - t_dep)
        stages["available->ready"].append(t_ready - t_av)
        last["deployment created"].append(t_dep - first)
        last["available"].append(t_av - first)
        last["ready"].append(t_ready - first)

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    for k, xs in stages.items():
        log(f"{label}: stage {k:<24} p50 {pct(xs, 0.5):5.0f}s  p90 {pct(xs, 0.9):5.0f}s  max {max(xs, default=float('nan')):5.0f}s  ({len(xs)} timed)")
    for k, xs in last.items():
        log(f"{label}: last {k:<20} at {max(xs, default=float('nan')):5.0f}s  (half at {pct(xs, 0.5):.0f}s)")


class Tracker:
    """Counts, from one watch, the objects of a collection (a label selector) that are done, and
    notes when all `n` are: the bench measures without polling the list it measures (a list of
    1,000 StreamConsumers is 3 MB, which the apiserver serializes and this process parses, twice a
    second, on the same 2 cores). Start it before the first create: `start` (what `wait` counts
    from) is when it has listed. It reconnects from the last resourceVersion (and lists again after
    a 410)."""

    def __init__(self, api, path, selector, n, is_done, label, what):
        self.api, self.path, self.selector, self.n = api, path, selector, n
        self.is_done, self.label, self.what = is_done, label, what
        self.state = {}
        self.lock = threading.Lock()
        self.all_done_at = None
        self.error = None
        self.stopped = threading.Event()
        self.rv = self._list()
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _key(self, obj):
        m = obj["metadata"]
        return (m.get("namespace"), m["name"])

    def _list(self):
        body = self.api.get(f"{self.path}?labelSelector={self.selector}")
        with self.lock:
            self.state = {self._key(o): bool(self.is_done(o)) for o in body["items"]}
            self._note()
        return body["metadata"]["resourceVersion"]

    def _note(self):
        if self.all_done_at is None and len(self.state) == self.n and all(self.state.values()):
            self.all_done_at = time.monotonic()

    def _run(self):
        while not self.stopped.is_set():
            host = self.api
            conn = http.client.HTTPSConnection(host.host, host.port, context=host.ctx, timeout=30)
            try:
                conn.request("GET", f"{self.path}?watch=1&labelSelector={self.selector}"
                             f"&resourceVersion={self.rv}&allowWatchBookmarks=true&timeoutSeconds=300",
                             headers={"Accept": "application/json"})
                resp = conn.getresponse()
                if resp.status != 200:
                    raise RuntimeError(f"watch {self.path}: HTTP {resp.status}")
                while not self.stopped.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    ev = json.loads(line)
                    obj = ev["object"]
                    if ev["type"] == "ERROR":
                        if obj.get("code") == 410:
                            self.rv = self._list()
                        break
                    self.rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] == "BOOKMARK":
                        continue
                    with self.lock:
                        if ev["type"] == "DELETED":
                            self.state.pop(self._key(obj), None)
                        else:
                            self.state[self._key(obj)] = bool(self.is_done(obj))
                        self._note()
            except socket.timeout:
                pass  # quiet for 30 s: reconnect from the last resourceVersion
            except (OSError, http.client.HTTPException, ValueError, RuntimeError) as e:
                self.error = e
                time.sleep(0.5)
            finally:
                conn.close()

    def counts(self):
        with self.lock:
            return len(self.state), sum(self.state.values())

    def wait(self, timeout, check=lambda: None):
        """Seconds from `start` until all were done; logs the count every 10 s."""
        deadline = time.monotonic() + timeout
        last_report = 0.0
        try:
            while self.all_done_at is None:
                check()
                now = time.monotonic()
                if now > deadline:
                    seen, done = self.counts()
                    raise TimeoutError(f"timed out after {timeout}s waiting for {self.n} {self.what}"
                                       f" ({done} of {seen} seen; watch error: {self.error})")
                if now - self.start - last_report >= 10:
                    last_report = now - self.start
                    log(f"{self.label}: {self.counts()[1]}/{self.n} {self.what} after {last_report:.0f}s")
                time.sleep(0.2)
            return self.all_done_at - self.start
        finally:
            self.stopped.set()


def bare_deployment(ns, name, run_id):
    labels = {"app.kubernetes.io/name": "scale-floor", "app.kubernetes.io/instance": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {RUN_LABEL: run_id}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "worker",
                    "image": "streamops-worker:scale-floor",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                }]},
            },
        },
    }


def deployment_ready(d):
    st = d.get("status") or {}
    return st.get("observedGeneration") == d["metadata"].get("generation") and st.get("readyReplicas") == 1


def run_floor(api, args, n, namespaces):
    """N bare Deployments made Ready by the control plane alone (no operator running)."""
    run_id = f"floor{n}-{int(time.time())}"
    names = [(namespaces[i % len(namespaces)], f"floor-{i:04d}") for i in range(n)]
    _, total_before, prof_before = snapshot(api)
    tracker = Tracker(api, "/apis/apps/v1/deployments", f"{RUN_LABEL}%3D{run_id}", n, deployment_ready,
                      f"N={n} floor", "Deployments ready")

    def create(item):
        ns, name = item
        api.request("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", bare_deployment(ns, name, run_id))

    with ThreadPoolExecutor(max_workers=args.create_threads) as pool:
        list(pool.map(create, names))
    took = tracker.wait(args.timeout)
    _, total_after, prof_after = snapshot(api)
    log(f"N={n} floor: {n} bare Deployments ready in {took:.1f}s")
    profile_delta(prof_before, prof_after, n, f"N={n} floor")
    # Delete them (and wait until their pods are gone), so the operator's run starts clean.
    for ns in namespaces:
        api.request("DELETE", f"/apis/apps/v1/namespaces/{ns}/deployments?labelSelector={RUN_LABEL}%3D{run_id}",
                    ok=(200, 404))
    wait_until(
        "the bare Deployments' pods to be deleted", 300,
        lambda: not api.get("/api/v1/pods?labelSelector=app.kubernetes.io%2Fname%3Dscale-floor&limit=1")["items"],
        interval=1.0,
    )
    return took, (total_after - total_before) / n


def run_size(api, args, n, brokers_json):
    run_id = f"n{n}-{int(time.time())}"
    namespaces = [f"scale-{n}-{i:02d}" for i in range(args.namespaces)]
    kubeconfig = os.path.join(args.work, "operator.kubeconfig")
    token_kubeconfig(args, kubeconfig)
    ops = []
    result = {"n": n}
    try:
        for ns in namespaces:
            api.request("POST", "/api/v1/namespaces",
                        {"metadata": {"name": ns, "labels": {RUN_LABEL: run_id}}}, ok=(201, 409))
        if args.floor:
            result["floor_s"], result["floor_requests_per_d"] = run_floor(api, args, n, namespaces)
        # A lease left by an earlier run (the control plane keeps its etcd data) names an operator of
        # the same name: it would be taken for this run's leader. Remove it first.
        api.request("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/{args.system_ns}/leases/{args.lease}",
                    ok=(200, 404))
        ops = [Operator(args, f"scale-op-{n}-{x}", kubeconfig, free_port(), brokers_json) for x in "ab"]
        # Wait for a leader before creating anything, so that the figures do not include the start.
        def leader():
            h = lease_holder(api, args.system_ns, args.lease)
            return next((o for o in ops if h and h.startswith(o.name + "_")), None)

        lead = wait_until("an operator to hold the lease", 60, leader)
        for o in ops:
            if not o.alive():
                raise RuntimeError(f"operator {o.name} exited; log: {o.log_path}")
        time.sleep(1.0)  # its watches are established
        op_pids = [o.pid for o in ops]
        ops_before, total_before, prof_before = snapshot(api, args.lease + "-leader-election", op_pids)

        names = [(namespaces[i % len(namespaces)], f"sc-{i:04d}") for i in range(n)]
        tracker = Tracker(api, sc_path(), f"{RUN_LABEL}%3D{run_id}", n, converged, f"N={n}", "converged")
        start = tracker.start

        def create(item):
            ns, name = item
            api.request("POST", sc_path(ns), stream_consumer(ns, name, run_id, args.brokers))

        with ThreadPoolExecutor(max_workers=args.create_threads) as pool:
            list(pool.map(create, names))
        created = time.monotonic() - start
        log(f"N={n}: created {n} StreamConsumers in {created:.1f}s")

        def operators_alive():
            if not any(o.alive() for o in ops):
                raise RuntimeError(f"every operator exited; logs: {', '.join(o.log_path for o in ops)}")

        result["converge_s"] = tracker.wait(args.timeout, check=operators_alive)
        result["create_s"] = created
        ops_after, total_after, prof_after = snapshot(api, args.lease + "-leader-election", op_pids)
        result["op_requests_per_sc"] = (ops_after - ops_before) / n
        result["all_requests_per_sc"] = (total_after - total_before) / n
        result["profile"] = profile_delta(prof_before, prof_after, n, f"N={n}")
        stage_breakdown(api, run_id, f"N={n}")
        result["leader_hwm_kib"] = vm_kib(lead.pid, "VmHWM")
        result["leader_rss_kib"] = vm_kib(lead.pid, "VmRSS")
        standby = next(o for o in ops if o is not lead)
        result["standby_hwm_kib"] = vm_kib(standby.pid, "VmHWM")
        log(f"N={n}: converged in {result['converge_s']:.1f}s; leader VmHWM {result['leader_hwm_kib']} KiB")

        # Settle: the steady state after convergence (lag readings, status refreshes).
        if args.settle > 0:
            ops_s0, _ = request_counts(api, args.lease + "-leader-election")
            time.sleep(args.settle)
            ops_s1, _ = request_counts(api, args.lease + "-leader-election")
            result["idle_rps"] = (ops_s1 - ops_s0) / args.settle
            result["leader_hwm_settled_kib"] = vm_kib(lead.pid, "VmHWM")

        # The chart's FlowSchema carries the Lease requests, in the leader-election priority level.
        result["lease_requests_by_level"] = lease_requests(api, args.lease + "-leader-election")
        log(f"N={n}: Lease requests through the chart's FlowSchema: {result['lease_requests_by_level']}")

        # Fail-over: SIGKILL the leader, change one StreamConsumer.
        ns, name = names[n // 2]
        lead.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        patched = api.request(
            "PATCH", sc_path(ns, name), {"spec": {"batch": {"maxWaitMs": 250}}},
            content_type="application/merge-patch+json",
        )[1]
        generation = patched["metadata"]["generation"]
        lead.proc.wait()
        t_lease = wait_until(
            "the standby to take the lease", 120,
            lambda: (time.monotonic() - t0) if (lease_holder(api, args.system_ns, args.lease) or "").startswith(standby.name + "_") else None,
            interval=0.1,
        )

        def change_reconciled():
            sc = api.get(sc_path(ns, name))
            ok = sc["metadata"]["generation"] == generation and converged(sc)
            return (time.monotonic() - t0) if ok else None

        t_rec = wait_until("the change to be reconciled by the new leader", 180, change_reconciled, interval=0.2)
        result["failover_lease_s"] = t_lease
        result["failover_reconciled_s"] = t_rec

        # The new leader starts cold: it reconciles all N again. Its peak RSS once it has.
        Tracker(api, sc_path(), f"{RUN_LABEL}%3D{run_id}", n, converged, f"N={n} new leader",
                "converged").wait(args.timeout)
        result["new_leader_hwm_kib"] = vm_kib(standby.pid, "VmHWM")
        for o in ops:
            if o is not lead and not o.alive():
                raise RuntimeError(f"operator {o.name} exited; log: {o.log_path}")
        # Before the clean-up, which can take minutes at 1,000.
        log(f"N={n}: figures {json.dumps(result)}")
        return result
    finally:
        # Delete with an operator still running (finalizers), then stop the operators.
        if any(o.alive() for o in ops):
            try:
                for ns in namespaces:
                    api.request("DELETE", sc_path(ns), ok=(200, 404))
                wait_until(
                    "the StreamConsumers to be deleted", 300,
                    lambda: not api.get(sc_path() + f"?labelSelector={RUN_LABEL}%3D{run_id}&limit=1")["items"],
                    interval=1.0,
                )
            except (TimeoutError, RuntimeError) as e:
                log(f"warning: {e}")
        for o in ops:
            o.kill()
        delete_namespaces(api, namespaces, 240)


def start_kwok(args, api):
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "type": "kwok"},
        },
        "spec": {},
    }
    api.request("POST", "/api/v1/nodes", node, ok=(201, 409))
    logf = open(os.path.join(args.work, "kwok.log"), "w")
    proc = subprocess.Popen(
        [args.kwok, f"--kubeconfig={args.kubeconfig}", f"--config={args.kwok_stages}",
         "--manage-all-nodes=false",
         "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
         "--manage-nodes-with-label-selector=", "--manage-single-node=",
         # Addresses written into the fake statuses only; nothing connects to them.
         "--node-ip=127.0.0.1", "--cidr=10.244.0.0/16", "--node-lease-duration-seconds=40"],
        stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
    )

    def node_ready():
        if proc.poll() is not None:
            raise RuntimeError(f"kwok exited ({proc.returncode}); log: {args.work}/kwok.log")
        conds = (api.get(f"/api/v1/nodes/{NODE_NAME}").get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    wait_until("kwok's fake node to be Ready", 60, node_ready)
    return proc, logf


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="100,500,1000")
    p.add_argument("--namespaces", type=int, default=20)
    p.add_argument("--server", required=True)
    p.add_argument("--pki", required=True)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--kubectl", required=True)
    p.add_argument("--kwok", required=True)
    p.add_argument("--kwok-stages", required=True)
    p.add_argument("--operator-bin", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--system-ns", default="streamops-scale")
    p.add_argument("--service-account", default="streamops-scale-operator")
    p.add_argument("--lease", default="streamops-scale-operator")
    p.add_argument("--brokers", default="127.0.0.1:9092")
    p.add_argument("--lag-interval", type=int, default=30)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--settle", type=float, default=float(os.environ.get("BENCH_SCALE_SETTLE", "20")))
    p.add_argument("--create-threads", type=int, default=8)
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the control-plane floor (bare Deployments, no operator)")
    args = p.parse_args()
    # A stopped bench (SIGTERM, as from `timeout` or `kill`) still runs its clean-up: the
    # `finally` blocks delete its StreamConsumers and namespaces. Without this, 1,000 of them were
    # left in the control plane's etcd, and the next cluster tests on it waited on a garbage
    # collector busy with their Deployments.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(args.work, exist_ok=True)
    api = Api(args.server, args.pki)
    brokers_json = json.dumps([{"name": "dev", "bootstrapServers": [args.brokers]}])

    kwok, kwok_log = start_kwok(args, api)
    results = []
    try:
        for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
            results.append(run_size(api, args, n, brokers_json))
            log(f"result: {json.dumps(results[-1])}")
    finally:
        if kwok.poll() is None:
            kwok.send_signal(signal.SIGTERM)
            try:
                kwok.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kwok.kill()
                kwok.wait()
        kwok_log.close()
        api.request("DELETE", f"/api/v1/nodes/{NODE_NAME}", ok=(200, 404))
    print_table(results, args)


def print_table(results, args):
    def mib(kib):
        return "-" if kib is None else f"{kib / 1024:.1f}"

    print()
    print(f"Scale bench: StreamConsumers across {args.namespaces} namespaces, 2 operator replicas "
          f"(release build, leader election, chart RBAC), lag interval {args.lag_interval}s, kwok fake node")
    hdr = ("N", "create s", "converge s", "leader RSS peak MiB", "new leader peak MiB", "standby MiB",
           "floor s", "converge/floor", "floor req/D", "operator req/SC", "apiserver req/SC", "idle op req/s", "fail-over lease s", "fail-over reconciled s")
    rows = []
    for r in results:
        rows.append((
            str(r["n"]), f"{r['create_s']:.1f}", f"{r['converge_s']:.1f}", mib(r["leader_hwm_kib"]),
            mib(r.get("new_leader_hwm_kib")), mib(r["standby_hwm_kib"]),
            f"{r['floor_s']:.1f}" if "floor_s" in r else "-",
            f"{r['converge_s'] / r['floor_s']:.2f}" if "floor_s" in r else "-",
            f"{r['floor_requests_per_d']:.1f}" if "floor_s" in r else "-",
            f"{r['op_requests_per_sc']:.1f}",
            f"{r['all_requests_per_sc']:.1f}", f"{r.get('idle_rps', float('nan')):.1f}",
            f"{r['failover_lease_s']:.1f}", f"{r['failover_reconciled_s']:.1f}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(hdr)]
    print("  ".join(h.rjust(w) for h, w in zip(hdr, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print("floor: N bare Deployments (no operator) made Ready by the same control plane just before; "
          "floor req/D: apiserver requests per bare Deployment.")
    print("Targets: leader RSS peak < 64 MiB at 1,000 and growing linearly; converge < 60 s. "
          "operator req/SC: apiserver_flowcontrol_dispatched_requests_total{flow_schema=service-accounts} "
          "(both replicas, lease renewals included) over the convergence, per StreamConsumer.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
