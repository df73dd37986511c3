use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use streamops_crds::config::WORKER_HTTP_PORT;

use super::BuildContext;
use crate::names::{selector_labels, workload_name, Component, HTTP_PORT_NAME};

/// `spec.clusterIP` of a headless Service.
pub const HEADLESS: &str = "None";

/// A headless Service over the workers' HTTP port, for scraping `/metrics` (and for the
/// operator's lag reader, which finds the workers through its EndpointSlices). No virtual IP:
/// nothing needs one, and allocating one (an `IPAddress` object per Service) was most of the
/// cost of creating a StreamConsumer's children. The EndpointSlice controller keeps slices for a
/// headless Service with a selector as for any other. Services of earlier versions had a
/// ClusterIP; `clusterIP` is immutable, so the reconciler replaces them.
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
