#!/usr/bin/env python3
"""Checks and unit-tests the chart's PrometheusRule with promtool (`make alerts-test`).

Renders charts/streamops with prometheusRule.enabled=true (helm, as `make validate` finds it),
extracts the rule groups of the PrometheusRule into a Prometheus rules file, then runs
`promtool check rules` on it and `promtool test rules` with scripts/alerts/prometheusrule_test.yaml.
promtool is built once from Go modules by scripts/promtool.sh (version in versions.env). Exits
non-zero on any failure; never skips.
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from validate_manifests import Helm  # noqa: E402  (the same helm `make validate` uses)


def main() -> int:
    promtool = subprocess.run(["bash", str(ROOT / "scripts" / "promtool.sh")], check=True,
                              capture_output=True, text=True).stdout.strip()
    helm = Helm()
    try:
        out = helm.template({"prometheusRule.enabled": "true"}).stdout
    finally:
        helm.close()
    rules = [d for d in yaml.safe_load_all(out) if d and d.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        print(f"expected one PrometheusRule in the rendered chart, found {len(rules)}", file=sys.stderr)
        return 1
    groups = rules[0]["spec"]["groups"]
    alerts = sorted(r["alert"] for g in groups for r in g["rules"])
    print(f"PrometheusRule {rules[0]['metadata']['name']}: {len(alerts)} alerts: {', '.join(alerts)}")
    with tempfile.TemporaryDirectory(prefix="streamops-alerts-") as tmp:
        tmp = Path(tmp)
        (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        shutil.copy(ROOT / "scripts" / "alerts" / "prometheusrule_test.yaml", tmp / "test.yaml")
        for args in (["check", "rules", "rules.yaml"], ["test", "rules", "test.yaml"]):
            print(f"$ promtool {' '.join(args)}", flush=True)
            if subprocess.run([promtool, *args], cwd=tmp).returncode != 0:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
