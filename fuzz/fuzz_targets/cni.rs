//! What a container runtime hands the CNI plugin (network config on stdin,
//! `CNI_*` variables, `CNI_ARGS`) and what the plugin sends the agent.
//!
//! Input: one byte choosing the decoder, then the bytes.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use node_agent::cni::{protocol, spec};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match kind % 5 {
        0 => {
            let _ = spec::NetConf::parse(rest);
        }
        1 => {
            let _ = spec::CniArgs::parse(&text);
        }
        2 => {
            let _ = spec::parse_labels(&text);
        }
        3 => {
            // `KEY=VALUE` lines, as the environment.
            let env: HashMap<String, String> = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let _ = spec::CniEnv::from_env(&env);
        }
        _ => {
            let _ = serde_json::from_slice::<protocol::AgentRequest>(rest);
            let _ = serde_json::from_slice::<protocol::AgentResponse>(rest);
        }
    }
});
