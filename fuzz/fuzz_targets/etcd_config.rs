//! Cilium-style etcd config files, as an operator or a remote cluster's
//! `export` hands them over: refused with an error naming the file and the
//! key, never a panic or a hang (TLS paths they name are read, bounded).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let dir = std::env::temp_dir().join("mesh-fuzz-etcd-config");
    let _ = kvstore::EtcdConfig::from_yaml(&text, &dir.join("cluster"));
});
