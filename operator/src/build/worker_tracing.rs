//! OpenTelemetry settings the operator's admin gives every worker (chart values
//! `workerTracing.*`, operator flags `--worker-otlp-*`): the standard `OTEL_*` environment the
//! worker's tracing reads (see the worker's `telemetry` module).
//!
//! Nothing secret passes through the operator: OTLP headers (which often carry an API token) reach
//! the workers only as a `secretKeyRef` to a Secret in the StreamConsumer's namespace, and the
//! names accepted as plain values exclude every `*_HEADERS` variable.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};

use super::BuildContext;

/// The only OTLP protocol the worker exports with.
pub const OTLP_PROTOCOL: &str = "http/protobuf";

/// What the admin set (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerTracing {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` of the workers, e.g. `http://collector.observability:4318`.
    pub endpoint: String,
    /// Further resource attributes (`key=value,...`), after the operator's own.
    pub resource_attributes: Option<String>,
    /// Further plain `OTEL_*` variables (sampler, timeouts, batch processor...).
    pub env: Vec<(String, String)>,
    /// Secret name and key whose value becomes `OTEL_EXPORTER_OTLP_HEADERS`.
    pub headers_secret: Option<(String, String)>,
}

/// Why the admin's tracing settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TracingSettingsError {
    /// The endpoint is not an http(s) URL.
    #[error("--worker-otlp-endpoint must be an http:// or https:// URL")]
    Endpoint,
    /// A protocol the worker does not export with.
    #[error("--worker-otlp-protocol {0:?}: the worker exports only {OTLP_PROTOCOL}")]
    Protocol(String),
    /// An entry of `--worker-otel-env` that is not `OTEL_NAME=value`.
    #[error("--worker-otel-env entry {0:?} is not OTEL_NAME=value")]
    EnvEntry(String),
    /// A variable the operator sets itself, or one that may hold a secret.
    #[error(
        "--worker-otel-env may not set {0}: the endpoint, protocol and resource attributes have \
         flags of their own, and OTLP headers come only from --worker-otlp-headers-secret-name"
    )]
    Reserved(String),
}

/// Variables set from their own flags, or (headers) only from a Secret.
fn reserved(name: &str) -> bool {
    name.ends_with("_HEADERS")
        || matches!(
            name,
            "OTEL_EXPORTER_OTLP_ENDPOINT"
                | "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                | "OTEL_EXPORTER_OTLP_PROTOCOL"
                | "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
                | "OTEL_RESOURCE_ATTRIBUTES"
        )
}

impl WorkerTracing {
    /// The settings from the operator's flags; `Ok(None)` when no endpoint is set (no tracing).
    /// `env` entries are `OTEL_NAME=value`.
    pub fn from_flags(
        endpoint: Option<&str>,
        protocol: &str,
        resource_attributes: Option<&str>,
        env: &[String],
        headers_secret_name: Option<&str>,
        headers_secret_key: &str,
    ) -> Result<Option<Self>, TracingSettingsError> {
        let Some(endpoint) = endpoint.map(str::trim).filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let lower = endpoint.to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            return Err(TracingSettingsError::Endpoint);
        }
        if protocol.trim() != OTLP_PROTOCOL {
            return Err(TracingSettingsError::Protocol(protocol.to_string()));
        }
        let mut vars = Vec::new();
        for entry in env.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let Some((name, value)) = entry.split_once('=') else {
                return Err(TracingSettingsError::EnvEntry(entry.to_string()));
            };
            let name = name.trim();
            let valid = name.starts_with("OTEL_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return Err(TracingSettingsError::EnvEntry(name.to_string()));
            }
            if reserved(name) {
                return Err(TracingSettingsError::Reserved(name.to_string()));
            }
            vars.push((name.to_string(), value.trim().to_string()));
        }
        Ok(Some(Self {
            endpoint: endpoint.to_string(),
            resource_attributes: resource_attributes
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string),
            env: vars,
            headers_secret: headers_secret_name
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| (n.to_string(), headers_secret_key.trim().to_string())),
        }))
    }
}

fn value(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

/// The worker's `OTEL_*` environment: endpoint, protocol, resource attributes naming the
/// StreamConsumer (`k8s.namespace.name`, `streamops.consumer`; the admin's attributes follow and
/// win on a shared key), the admin's plain variables, and the headers from the admin's Secret
/// (optional: a namespace without it exports without headers).
pub fn tracing_env(ctx: &BuildContext<'_>, t: &WorkerTracing) -> Vec<EnvVar> {
    let mut attributes = format!(
        "k8s.namespace.name={},streamops.consumer={}",
        ctx.namespace, ctx.name
    );
    if let Some(extra) = &t.resource_attributes {
        attributes.push(',');
        attributes.push_str(extra);
    }
    let mut env = vec![
        value("OTEL_EXPORTER_OTLP_ENDPOINT", t.endpoint.clone()),
        value("OTEL_EXPORTER_OTLP_PROTOCOL", OTLP_PROTOCOL.into()),
        value("OTEL_RESOURCE_ATTRIBUTES", attributes),
    ];
    env.extend(t.env.iter().map(|(n, v)| value(n, v.clone())));
    if let Some((name, key)) = &t.headers_secret {
        env.push(EnvVar {
            name: "OTEL_EXPORTER_OTLP_HEADERS".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: name.clone(),
                    key: key.clone(),
                    optional: Some(true),
                }),
                ..EnvVarSource::default()
            }),
        });
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{build_deployment, egress_ports, RenderedConfig, WorkerNetwork};
    use streamops_crds::StreamConsumer;

    fn flags(endpoint: &str, env: &[&str]) -> Result<Option<WorkerTracing>, TracingSettingsError> {
        let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
        WorkerTracing::from_flags(
            Some(endpoint),
            OTLP_PROTOCOL,
            Some("deployment.environment=prod"),
            &env,
            Some("otlp-auth"),
            "headers",
        )
    }

    #[test]
    fn no_endpoint_means_no_tracing() {
        assert_eq!(
            WorkerTracing::from_flags(None, OTLP_PROTOCOL, None, &[], None, "headers"),
            Ok(None)
        );
        assert_eq!(flags("  ", &[]), Ok(None));
    }

    #[test]
    fn plain_otel_variables_are_accepted_but_headers_and_flag_owned_ones_are_refused() {
        let t = flags(
            "http://collector:4318",
            &[
                "OTEL_TRACES_SAMPLER=parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG=0.1",
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.env.len(), 2);
        assert_eq!(
            t.headers_secret,
            Some(("otlp-auth".into(), "headers".into()))
        );
        for bad in [
            "OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer x",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS=a=b",
            "OTEL_EXPORTER_OTLP_ENDPOINT=http://elsewhere",
            "OTEL_RESOURCE_ATTRIBUTES=a=b",
        ] {
            let e = flags("http://collector:4318", &[bad]).unwrap_err();
            assert!(matches!(e, TracingSettingsError::Reserved(_)), "{bad}: {e}");
            // The refusal names the variable, never its value.
            assert!(!e.to_string().contains("Bearer"));
        }
        assert!(matches!(
            flags("http://collector:4318", &["RUST_LOG=debug"]),
            Err(TracingSettingsError::EnvEntry(_))
        ));
        assert!(matches!(
            flags("http://collector:4318", &["OTEL_TRACES_SAMPLER"]),
            Err(TracingSettingsError::EnvEntry(_))
        ));
        assert_eq!(
            flags("collector:4317", &[]),
            Err(TracingSettingsError::Endpoint)
        );
        assert!(matches!(
            WorkerTracing::from_flags(Some("http://c:4317"), "grpc", None, &[], None, "headers"),
            Err(TracingSettingsError::Protocol(_))
        ));
    }

    #[test]
    fn workers_get_the_otel_environment_with_headers_only_from_a_secret_and_egress_to_the_collector(
    ) {
        let sc = StreamConsumer::test();
        let rendered = RenderedConfig::render(&sc).unwrap();
        let t = flags(
            "http://collector.observability:4318",
            &["OTEL_TRACES_SAMPLER=parentbased_traceidratio"],
        )
        .unwrap();
        let ctx = BuildContext::new(&sc, "example.com/worker:1", &rendered, 1)
            .unwrap()
            .with_tracing(t.as_ref());
        let d = build_deployment(&ctx);
        let env = d.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let get = |n: &str| env.iter().find(|e| e.name == n).cloned();
        assert_eq!(
            get("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap().value.as_deref(),
            Some("http://collector.observability:4318")
        );
        assert_eq!(
            get("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap().value.as_deref(),
            Some("http/protobuf")
        );
        assert_eq!(
            get("OTEL_RESOURCE_ATTRIBUTES").unwrap().value,
            Some(format!(
                "k8s.namespace.name={},streamops.consumer={},deployment.environment=prod",
                ctx.namespace, ctx.name
            ))
        );
        assert_eq!(
            get("OTEL_TRACES_SAMPLER").unwrap().value.as_deref(),
            Some("parentbased_traceidratio")
        );
        let headers = get("OTEL_EXPORTER_OTLP_HEADERS").unwrap();
        assert_eq!(headers.value, None, "headers are never a literal");
        let r = headers.value_from.unwrap().secret_key_ref.unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("otlp-auth", "headers"));
        assert_eq!(r.optional, Some(true));

        let net = WorkerNetwork {
            postgres_ports: vec![5432],
            redis_ports: vec![6379],
            api_server_ports: vec![443],
        };
        assert!(egress_ports(&ctx, &net).contains(&4318));
        let without = BuildContext::new(&sc, "example.com/worker:1", &rendered, 1).unwrap();
        assert!(!egress_ports(&without, &net).contains(&4318));
        let plain = build_deployment(&without);
        assert!(plain.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .all(|e| !e.name.starts_with("OTEL_")));
    }
}
