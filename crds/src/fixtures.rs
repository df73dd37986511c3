//! Chainable test objects shared by the operator's and the worker's tests.

use crate::v1alpha1::*;

impl StreamConsumerSpec {
    /// A valid spec of the given handler kind, pointing at a local broker.
    pub fn example(kind: HandlerKind) -> Self {
        let mut handler = HandlerSpec {
            kind,
            moving_average: None,
            sensor: None,
            fraud: None,
            pipeline_trigger: None,
        };
        match kind {
            HandlerKind::MovingAverage => {
                handler.moving_average = Some(MovingAverageSettings::default())
            }
            HandlerKind::Sensor => handler.sensor = Some(SensorSettings::default()),
            HandlerKind::Fraud => {
                handler.fraud = Some(FraudSettings {
                    scoring_url: "http://127.0.0.1:8080/predict".into(),
                    timeout_ms: 2000,
                    max_retries: 3,
                    batch_size: 100,
                    fraud_threshold: 0.8,
                    circuit_breaker_failures: 5,
                    circuit_breaker_reset_ms: 30_000,
                    protocol: ScoringProtocol::Streamops,
                    retry_backoff: RetryBackoff::default(),
                })
            }
            HandlerKind::PipelineTrigger => {
                handler.pipeline_trigger = Some(PipelineTriggerSettings {
                    pipeline_name: "nightly-load".into(),
                    max_events: 1000,
                    max_time_seconds: 300,
                    trigger_on_empty_window: false,
                    consumer_id: None,
                    webhook: Some(WebhookSpec {
                        url: "http://127.0.0.1:8081/hook".into(),
                        timeout_ms: 5000,
                        max_retries: 5,
                        headers: Default::default(),
                        secret_headers: Vec::new(),
                        retry_backoff: default_webhook_backoff(),
                    }),
                    job: None,
                })
            }
        }
        let topic = match kind {
            HandlerKind::MovingAverage => "price-events",
            HandlerKind::Sensor => "machine.sensor.readings",
            HandlerKind::Fraud => "transactions",
            HandlerKind::PipelineTrigger => "pipeline-events",
        };
        Self {
            replicas: 1,
            kafka: KafkaSpec {
                bootstrap_servers: "127.0.0.1:9092".into(),
                topics: vec![topic.into()],
                group_id: format!("{kind}-consumer"),
                auto_offset_reset: AutoOffsetReset::Earliest,
                on_offset_gap: Default::default(),
                security: None,
                group_protocol: Default::default(),
                session_timeout_ms: default_session_timeout_ms(),
                max_poll_interval_ms: default_max_poll_interval_ms(),
            },
            handler,
            sink: SinkSpec {
                postgres: PostgresSink {
                    url_secret_ref: SecretKeyRef {
                        name: "pg".into(),
                        key: "url".into(),
                    },
                },
            },
            redis: (kind == HandlerKind::PipelineTrigger).then(|| RedisSpec {
                url_secret_ref: SecretKeyRef {
                    name: "redis".into(),
                    key: "url".into(),
                },
            }),
            error_topic: None,
            batch: BatchSpec::default(),
            max_message_bytes: 1_048_576,
            image: None,
            resources: None,
            log_level: None,
            progress_every: None,
            cleanup_policy: CleanupPolicy::Retain,
            autoscaling: None,
            suspend: false,
            replay: None,
        }
    }
}

impl StreamConsumer {
    /// A moving-average StreamConsumer `test` in namespace `default`, with a uid and generation 1.
    pub fn test() -> Self {
        Self::test_of(HandlerKind::MovingAverage)
    }

    /// A StreamConsumer of the given kind `test` in namespace `default`.
    pub fn test_of(kind: HandlerKind) -> Self {
        let mut sc = StreamConsumer::new("test", StreamConsumerSpec::example(kind));
        sc.metadata.namespace = Some("default".into());
        sc.metadata.uid = Some("752d59ef-2671-4890-9feb-0097459b18c8".into());
        sc.metadata.generation = Some(1);
        sc
    }

    /// Sets `spec.replicas`.
    pub fn with_replicas(mut self, replicas: i32) -> Self {
        self.spec.replicas = replicas;
        self
    }

    /// Sets `metadata.generation`.
    pub fn with_generation(mut self, generation: i64) -> Self {
        self.metadata.generation = Some(generation);
        self
    }

    /// Sets the status.
    pub fn with_status(mut self, status: StreamConsumerStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Marks the object as being deleted, with the given finalizer still on it.
    pub fn being_deleted(mut self, finalizer: &str) -> Self {
        self.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        self.metadata.finalizers = Some(vec![finalizer.to_string()]);
        self
    }

    /// Changes the spec with a closure.
    pub fn with_spec(mut self, f: impl FnOnce(&mut StreamConsumerSpec)) -> Self {
        f(&mut self.spec);
        self
    }
}
