use k8s_openapi::api::core::v1::ConfigMap;
use std::collections::BTreeMap;
use streamops_crds::config::CONFIG_FILE_NAME;

use super::BuildContext;
use crate::names::{config_map_name, Component};

/// The ConfigMap holding the rendered worker configuration under `worker.yaml`.
pub fn build_config_map(ctx: &BuildContext<'_>) -> ConfigMap {
    ConfigMap {
        metadata: ctx.child_meta(config_map_name(ctx.name), Component::Config),
        data: Some(BTreeMap::from([(
            CONFIG_FILE_NAME.to_string(),
            ctx.config.yaml.clone(),
        )])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_support::with_ctx;
    use streamops_crds::config::WorkerConfig;
    use streamops_crds::StreamConsumer;

    #[test]
    fn config_map_holds_the_rendered_configuration_the_worker_reads_back() {
        let sc = StreamConsumer::test();
        let cm = with_ctx(&sc, build_config_map);
        assert_eq!(cm.metadata.name.as_deref(), Some("test-config"));
        let yaml = &cm.data.unwrap()["worker.yaml"];
        let parsed = WorkerConfig::from_yaml(yaml).unwrap();
        assert_eq!(parsed, WorkerConfig::from_resource(&sc).unwrap());
    }
}
