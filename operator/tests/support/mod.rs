//! Support for the operator's integration tests: the shared Kafka and PostgreSQL helpers of
//! `streamops-test-support` (add `mod support;` to a test file).
#![allow(unused_imports)]

pub use streamops_test_support::*;
