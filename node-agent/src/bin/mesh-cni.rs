//! `mesh-cni`: the CNI plugin of the mesh (spec 1.0.0). A container runtime
//! runs it with the `CNI_*` environment and the network configuration on
//! stdin; it asks the node agent over its unix socket to do the work.

use std::{
    collections::HashMap,
    io::{Read, Write},
    process::ExitCode,
};

use node_agent::cni::{
    plugin,
    spec::{CniError, ErrorCode},
};

fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let mut stdin = Vec::new();
    let result = match std::io::stdin().take(1 << 20).read_to_end(&mut stdin) {
        Ok(_) => plugin::run(&env, &stdin),
        Err(e) => Err(CniError::new(
            ErrorCode::Io,
            "cannot read the network configuration from stdin",
            e.to_string(),
        )),
    };
    let mut out = std::io::stdout().lock();
    match result {
        Ok(json) => {
            if !json.is_empty() && writeln!(out, "{json}").is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            let json = serde_json::to_string(&err).unwrap_or_default();
            let _ = writeln!(out, "{json}");
            ExitCode::FAILURE
        }
    }
}
