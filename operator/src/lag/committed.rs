//! Committed offsets of any consumer group through one client: the Admin API's
//! ListConsumerGroupOffsets (one OffsetFetch to the group's coordinator).
//!
//! `Consumer::committed_offsets` asks for the client's own `group.id`, which would need one
//! librdkafka client (its threads, connections and buffers) per consumer group: at a thousand
//! StreamConsumers, a thousand clients. The rdkafka crate does not wrap ListConsumerGroupOffsets,
//! so it is called through librdkafka's C API here, and the answer is copied into a
//! [`TopicPartitionList`] before anything librdkafka owns is freed.

use std::ffi::{c_char, c_int, CStr, CString};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;

use super::LagError;

/// Frees what librdkafka allocated for one request, in reverse order of creation, however the
/// function returns.
struct Owned {
    queue: *mut rd::rd_kafka_queue_t,
    options: *mut rd::rd_kafka_AdminOptions_t,
    request: *mut rd::rd_kafka_ListConsumerGroupOffsets_t,
    event: *mut rd::rd_kafka_event_t,
}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or was returned by the matching librdkafka constructor and
        // is freed exactly once, here.
        unsafe {
            if !self.event.is_null() {
                rd::rd_kafka_event_destroy(self.event);
            }
            if !self.request.is_null() {
                rd::rd_kafka_ListConsumerGroupOffsets_destroy(self.request);
            }
            if !self.options.is_null() {
                rd::rd_kafka_AdminOptions_destroy(self.options);
            }
            if !self.queue.is_null() {
                rd::rd_kafka_queue_destroy(self.queue);
            }
        }
    }
}

fn fetch_error(code: RDKafkaErrorCode) -> LagError {
    LagError::Kafka(KafkaError::OffsetFetch(code))
}

/// The committed offset (and its metadata) of `group` for each of `partitions`. A partition
/// without a committed offset, or whose offset the coordinator could not give, has
/// [`Offset::Invalid`].
pub(super) fn committed_offsets(
    client: &BaseConsumer,
    group: &str,
    partitions: &TopicPartitionList,
    timeout: Duration,
) -> Result<TopicPartitionList, LagError> {
    let group = CString::new(group).map_err(|_| fetch_error(RDKafkaErrorCode::InvalidGroupId))?;
    let timeout_ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
    let rk = client.client().native_ptr();
    let mut owned = Owned {
        queue: std::ptr::null_mut(),
        options: std::ptr::null_mut(),
        request: std::ptr::null_mut(),
        event: std::ptr::null_mut(),
    };
    // SAFETY: `rk` is a live client for the duration of the call (borrowed from `client`); every
    // object created here is owned by `owned` and freed once; the partition list passed in is
    // copied by librdkafka (ListConsumerGroupOffsets_new), and the answer is read before the
    // event that owns it is destroyed.
    unsafe {
        owned.queue = rd::rd_kafka_queue_new(rk);
        owned.options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPOFFSETS,
        );
        if owned.queue.is_null() || owned.options.is_null() {
            return Err(fetch_error(RDKafkaErrorCode::Fail));
        }
        let mut errstr = [0 as c_char; 256];
        let err = rd::rd_kafka_AdminOptions_set_request_timeout(
            owned.options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(fetch_error(err.into()));
        }
        owned.request = rd::rd_kafka_ListConsumerGroupOffsets_new(group.as_ptr(), partitions.ptr());
        if owned.request.is_null() {
            return Err(fetch_error(RDKafkaErrorCode::Fail));
        }
        let mut requests = [owned.request];
        rd::rd_kafka_ListConsumerGroupOffsets(
            rk,
            requests.as_mut_ptr(),
            requests.len(),
            owned.options,
            owned.queue,
        );
        // The request timeout bounds the answer; a little more for the event to arrive.
        owned.event = rd::rd_kafka_queue_poll(owned.queue, timeout_ms.saturating_add(1000));
        if owned.event.is_null() {
            return Err(fetch_error(RDKafkaErrorCode::OperationTimedOut));
        }
        let err = rd::rd_kafka_event_error(owned.event);
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(fetch_error(err.into()));
        }
        let result = rd::rd_kafka_event_ListConsumerGroupOffsets_result(owned.event);
        if result.is_null() {
            return Err(fetch_error(RDKafkaErrorCode::Fail));
        }
        let mut count = 0usize;
        let groups = rd::rd_kafka_ListConsumerGroupOffsets_result_groups(result, &mut count);
        if groups.is_null() || count == 0 {
            return Err(fetch_error(RDKafkaErrorCode::Fail));
        }
        let group_result = *groups;
        let group_error = rd::rd_kafka_group_result_error(group_result);
        if !group_error.is_null() {
            return Err(fetch_error(rd::rd_kafka_error_code(group_error).into()));
        }
        let list = rd::rd_kafka_group_result_partitions(group_result);
        let mut out = TopicPartitionList::new();
        if list.is_null() {
            return Ok(out);
        }
        let n = usize::try_from((*list).cnt).unwrap_or(0);
        for i in 0..n {
            let e = &*(*list).elems.add(i);
            if e.topic.is_null() {
                continue;
            }
            let topic = CStr::from_ptr(e.topic).to_string_lossy();
            let offset = if e.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                Offset::from_raw(e.offset)
            } else {
                Offset::Invalid
            };
            let mut elem = out.add_partition(&topic, e.partition);
            elem.set_offset(offset).map_err(LagError::Kafka)?;
            if !e.metadata.is_null() && e.metadata_size > 0 {
                let bytes = std::slice::from_raw_parts(e.metadata.cast::<u8>(), e.metadata_size);
                // Gap notes are UTF-8; other metadata is no gap note (and never a panic).
                if let Ok(text) = std::str::from_utf8(bytes) {
                    elem.set_metadata(text);
                }
            }
        }
        Ok(out)
    }
}
