use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use streamops_crds::config::{Handler, WORKER_HTTP_PORT};

use super::BuildContext;
use crate::names::{selector_labels, workload_name, Component};

/// What the operator's admin set for worker NetworkPolicies (chart values
/// `workerNetworkPolicy.*`). The destinations of PostgreSQL and Redis are in Secrets the operator
/// never reads, so they are allowed by port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerNetwork {
    /// PostgreSQL ports.
    pub postgres_ports: Vec<u16>,
    /// Redis ports (pipeline-trigger only).
    pub redis_ports: Vec<u16>,
    /// Kubernetes API server ports (Job-trigger workers only).
    pub api_server_ports: Vec<u16>,
}

/// Port of an `http://` or `https://` URL: the explicit one, else 80 or 443.
pub fn url_port(url: &str) -> Option<u16> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    // [v6]:port or host:port
    let port = match host_port.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => port.parse().ok()?,
        _ => default,
    };
    Some(port)
}

fn tcp(port: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port.into())),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

/// The TCP ports a worker talks to, besides DNS: its brokers, PostgreSQL, Redis, its scorer or
/// webhook, and the API server for Job triggers.
pub fn egress_ports(ctx: &BuildContext<'_>, net: &WorkerNetwork) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for hp in ctx.config.config.kafka.bootstrap_servers.split(',') {
        if let Some(p) = hp.trim().rsplit_once(':').and_then(|(_, p)| p.parse().ok()) {
            ports.insert(p);
        }
    }
    ports.extend(&net.postgres_ports);
    match &ctx.config.config.handler {
        Handler::Fraud(f) => ports.extend(url_port(&f.scoring_url)),
        Handler::PipelineTrigger(p) => {
            ports.extend(&net.redis_ports);
            if let Some(w) = &p.webhook {
                ports.extend(url_port(&w.url));
            }
            if p.job.is_some() {
                ports.extend(&net.api_server_ports);
            }
        }
        Handler::MovingAverage(_) | Handler::Sensor(_) => {}
    }
    // The OTLP collector, when the admin set one.
    if let Some(t) = &ctx.tracing {
        ports.extend(url_port(&t.endpoint));
    }
    ports
}

/// The workers' NetworkPolicy: ingress only to the metrics port; egress only to DNS and
/// [`egress_ports`].
pub fn build_network_policy(ctx: &BuildContext<'_>, net: &WorkerNetwork) -> NetworkPolicy {
    let dns = ["UDP", "TCP"].map(|protocol| NetworkPolicyPort {
        port: Some(IntOrString::Int(53)),
        protocol: Some(protocol.into()),
        ..NetworkPolicyPort::default()
    });
    NetworkPolicy {
        metadata: ctx.child_meta(workload_name(ctx.name), Component::Worker),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(ctx.name)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                ports: Some(vec![tcp(WORKER_HTTP_PORT)]),
                from: None,
            }]),
            egress: Some(vec![
                NetworkPolicyEgressRule {
                    ports: Some(dns.to_vec()),
                    to: None,
                },
                NetworkPolicyEgressRule {
                    ports: Some(egress_ports(ctx, net).into_iter().map(tcp).collect()),
                    to: None,
                },
            ]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_support::with_ctx;
    use streamops_crds::v1alpha1::{HandlerKind, JobTriggerSpec};
    use streamops_crds::StreamConsumer;

    fn net() -> WorkerNetwork {
        WorkerNetwork {
            postgres_ports: vec![5432],
            redis_ports: vec![6379],
            api_server_ports: vec![443, 6443],
        }
    }

    fn ports_of(sc: &StreamConsumer) -> Vec<u16> {
        with_ctx(sc, |ctx| egress_ports(ctx, &net()).into_iter().collect())
    }

    #[test]
    fn url_ports_default_by_scheme() {
        assert_eq!(url_port("http://scorer:8080/predict"), Some(8080));
        assert_eq!(url_port("http://scorer/predict"), Some(80));
        assert_eq!(url_port("https://hooks.example.com"), Some(443));
        assert_eq!(url_port("https://u:p@hooks.example.com:8443/x"), Some(8443));
        assert_eq!(url_port("https://[::1]:9443/x"), Some(9443));
        assert_eq!(url_port("ftp://x"), None);
    }

    #[test]
    fn workers_reach_only_dns_their_brokers_postgres_and_their_own_services() {
        let sc = StreamConsumer::test()
            .with_spec(|s| s.kafka.bootstrap_servers = "k-0:9092,k-1:9093".into());
        assert_eq!(ports_of(&sc), [5432, 9092, 9093]);
        let fraud = StreamConsumer::test_of(HandlerKind::Fraud);
        let scoring = fraud
            .spec
            .handler
            .fraud
            .as_ref()
            .unwrap()
            .scoring_url
            .clone();
        assert!(ports_of(&fraud).contains(&url_port(&scoring).unwrap()));
        let hook = StreamConsumer::test_of(HandlerKind::PipelineTrigger);
        let p = ports_of(&hook);
        assert!(p.contains(&6379) && p.contains(&8081), "{p:?}");
        assert!(
            !p.contains(&443),
            "webhook workers do not reach the API server"
        );
        let job = hook.with_spec(|s| {
            let p = s.handler.pipeline_trigger.as_mut().unwrap();
            p.webhook = None;
            p.job = Some(JobTriggerSpec {
                template: serde_json::json!({"template": {"spec": {}}}),
            });
        });
        assert!(ports_of(&job).contains(&6443));
    }

    #[test]
    fn ingress_is_only_the_metrics_port_of_the_workers() {
        let np = with_ctx(&StreamConsumer::test(), |ctx| {
            build_network_policy(ctx, &net())
        });
        assert_eq!(np.metadata.name.as_deref(), Some("test"));
        let spec = np.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels.unwrap(),
            selector_labels("test")
        );
        assert_eq!(
            spec.policy_types.unwrap(),
            ["Ingress".to_string(), "Egress".to_string()]
        );
        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 1);
        assert_eq!(
            ingress[0].ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(8080))
        );
        let egress = spec.egress.unwrap();
        assert_eq!(egress.len(), 2);
        assert!(egress.iter().all(|r| r.to.is_none()));
        let dns: Vec<_> = egress[0]
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.port.clone())
            .collect();
        assert_eq!(
            dns,
            [Some(IntOrString::Int(53)), Some(IntOrString::Int(53))]
        );
    }
}
