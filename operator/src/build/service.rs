use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use streamops_crds::config::WORKER_HTTP_PORT;

use super::BuildContext;
use crate::names::{selector_labels, workload_name, Component, HTTP_PORT_NAME};

/// `spec.clusterIP` of a headless Service.
pub const HEADLESS: &str = "None";

/// A headless Service over the workers' HTTP port, through whose EndpointSlices the operator's
/// lag reader finds the workers of a StreamConsumer whose brokers it may not contact
/// ([`crate::lag_workers`]). Only such a StreamConsumer has one
/// ([`BuildContext::worker_lag_reports`]): the lag of every other one comes from its brokers, and
/// Prometheus scrapes the workers through the chart's PodMonitor, so a Service would only cost
/// the API server (its create, and the Endpoints and EndpointSlice controllers' writes, about a
/// fifth of a StreamConsumer's requests) and the controller manager. One left from an earlier
/// version or an earlier broker allow-list is deleted. No virtual IP: nothing needs one, and
/// allocating one (an `IPAddress` object per Service) was most of the cost of creating a
/// StreamConsumer's children. The EndpointSlice controller keeps slices for a headless Service
/// with a selector as for any other. Services of earlier versions had a ClusterIP; `clusterIP`
/// is immutable, so the reconciler replaces them.
pub fn build_service(ctx: &BuildContext<'_>) -> Service {
    Service {
        metadata: ctx.child_meta(workload_name(ctx.name), Component::Metrics),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(HEADLESS.into()),
            selector: Some(selector_labels(ctx.name)),
            ports: Some(vec![ServicePort {
                name: Some(HTTP_PORT_NAME.into()),
                port: i32::from(WORKER_HTTP_PORT),
                target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_support::with_ctx;
    use streamops_crds::StreamConsumer;

    #[test]
    fn service_is_headless_selects_the_workers_and_exposes_the_http_port() {
        let svc = with_ctx(&StreamConsumer::test(), build_service);
        assert_eq!(svc.metadata.name.as_deref(), Some("test"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
        assert_eq!(
            spec.cluster_ips, None,
            "set by the API server from clusterIP"
        );
        assert_eq!(spec.selector.unwrap(), selector_labels("test"));
        let port = &spec.ports.unwrap()[0];
        assert_eq!(port.port, 8080);
        assert_eq!(port.name.as_deref(), Some("http"));
        assert_eq!(port.target_port, Some(IntOrString::String("http".into())));
    }
}
