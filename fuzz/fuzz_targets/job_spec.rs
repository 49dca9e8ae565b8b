//! The job parser: any bytes as a spool file, an RPC submission or `cybctl validate` reads
//! them. It must never panic (libFuzzer's panic hook aborts even inside parse_job's own
//! catch_unwind, so a panic is found, not hidden), and what it accepts must be written and
//! read back as the same spec, as the store does with a record.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = cyb_proto::parse_job(data) else {
        return;
    };
    let written = serde_json::to_vec_pretty(&spec).expect("an accepted spec serializes");
    let back = cyb_proto::parse_job(&written).expect("an accepted spec, written out, is accepted");
    assert_eq!(back, spec, "an accepted spec reads back differently");
});
