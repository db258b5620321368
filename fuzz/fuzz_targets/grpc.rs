//! Requests to the clustermesh-apiserver's gRPC API and the services it
//! streams to agents: protobuf decoding, then the one parser of the wire
//! messages into the registry model (what the apiserver and the agent run).
//!
//! Input: one byte choosing the message, then its protobuf encoding.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::{convert, v1 as pb};
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            if let Ok(req) = pb::RegisterNodeRequest::decode(rest) {
                if let Ok(node) = convert::node(req.node) {
                    let again = convert::node(Some(convert::node_to_proto(&node)))
                        .expect("a parsed node encodes to a valid one");
                    assert_eq!(again, node);
                }
            }
        }
        1 => {
            if let Ok(req) = pb::UpsertEndpointRequest::decode(rest) {
                if let Ok(ep) = convert::endpoint("n1", req.endpoint) {
                    let again = convert::endpoint("n1", Some(convert::endpoint_to_proto(&ep)))
                        .expect("a parsed endpoint encodes to a valid one");
                    assert_eq!(again, ep);
                }
            }
        }
        2 => {
            if let Ok(req) = pb::UpsertServiceRequest::decode(rest) {
                if let Ok(svc) = convert::service(req.service) {
                    let again = convert::service(Some(convert::service_to_proto(&svc)))
                        .expect("a parsed service encodes to a valid one");
                    assert_eq!(again, svc);
                }
            }
        }
        _ => {
            if let Ok(registered) = pb::RegisteredService::decode(rest) {
                let _ = convert::registered_service(registered);
            }
        }
    }
});
