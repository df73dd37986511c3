//! The fraud decoder never panics, gives every rejection a reason, and whatever it accepts can be
//! written (see `streamops_fuzz::oracle::transaction`). The record timestamp is fixed here (the
//! corpus is plain JSON, replayed through PostgreSQL); `decode_transaction_record` fuzzes it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamops_fuzz::oracle;

fuzz_target!(|data: &[u8]| {
    oracle::transaction(data, oracle::reference());
});
