//! The RPC frame decoder, as the daemon reads a connection: bytes through the same
//! length-delimited codec (`cyb_proto::rpc::codec`) and the same JSON reader of the
//! server's request type (`cyb_proto::rpc::ServerJson`, tarpc's `ClientMessage<CybRequest>`)
//! that `server_transport` puts on every accepted socket. No input may panic.
#![no_main]

use std::pin::Pin;

use libfuzzer_sys::fuzz_target;
use tarpc::tokio_serde::Deserializer as _;
use tarpc::tokio_util::bytes::BytesMut;
use tarpc::tokio_util::codec::Decoder as _;

fuzz_target!(|data: &[u8]| {
    let mut codec = cyb_proto::rpc::codec(cyb_proto::rpc::max_request_frame(1 << 20));
    let mut json = cyb_proto::rpc::ServerJson::default();
    let mut buf = BytesMut::from(data);
    // Frames until the input runs out, then what the codec makes of the rest at EOF.
    loop {
        let frame = match codec.decode(&mut buf) {
            Ok(Some(f)) => f,
            Ok(None) => match codec.decode_eof(&mut buf) {
                Ok(Some(f)) => f,
                _ => break,
            },
            Err(_) => break,
        };
        if let Ok(tarpc::ClientMessage::Request(req)) = Pin::new(&mut json).deserialize(&frame)
            && let cyb_proto::rpc::CybRequest::Submit { req } | cyb_proto::rpc::CybRequest::Check { req } =
                req.message
        {
            // What the server then does with a submission's text.
            let _ = cyb_proto::parse_job(req.spec_json.as_bytes());
        }
    }
});
