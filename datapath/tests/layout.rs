//! Checks that every struct in `bpf/datapath.h` has the size and field
//! offsets of its `#[repr(C)]` twin in `datapath::abi`, as the C compiler
//! sees them: a C program including the header prints `sizeof`/`offsetof`.

use std::{collections::BTreeMap, mem::offset_of, path::Path, process::Command};

use datapath::abi::*;

macro_rules! layout {
    ($out:ident, $c:literal, $ty:ty, [$($field:ident),+ $(,)?]) => {{
        $out.push(($c, "sizeof", std::mem::size_of::<$ty>()));
        $(
            $out.push(($c, stringify!($field), offset_of!($ty, $field)));
        )+
    }};
}

fn rust_layout() -> Vec<(&'static str, &'static str, usize)> {
    let mut v = Vec::new();
    layout!(v, "ipcache_key", IpcacheKey, [prefixlen, family, pad, addr]);
    layout!(
        v,
        "ipcache_value",
        IpcacheValue,
        [identity, tunnel_endpoint, flags, pad]
    );
    layout!(v, "endpoint_key", EndpointKey, [family, pad, addr]);
    layout!(
        v,
        "endpoint_info",
        EndpointInfo,
        [
            ifindex,
            identity,
            endpoint_id,
            flags,
            pod_mac,
            host_mac,
            pad
        ]
    );
    layout!(v, "service_key", ServiceKey, [addr, port, proto, family]);
    layout!(
        v,
        "service_value",
        ServiceValue,
        [service_id, backend_count, maglev_id, flags]
    );
    layout!(
        v,
        "backend_value",
        BackendValue,
        [addr, port, proto, family, cluster_id, state, pad, service_id]
    );
    layout!(
        v,
        "ct_key",
        CtKey,
        [saddr, daddr, sport, dport, proto, family, dir, pad]
    );
    layout!(
        v,
        "ct_value",
        CtValue,
        [addr, port, flags, pad, service_id, backend_id]
    );
    layout!(
        v,
        "policy_key",
        PolicyKey,
        [endpoint_id, identity, dport, proto, direction]
    );
    layout!(
        v,
        "policy_value",
        PolicyValue,
        [verdict, pad, packets, bytes]
    );
    layout!(
        v,
        "datapath_config",
        DatapathConfig,
        [flags, vxlan_ifindex, maglev_size, abi_version]
    );
    layout!(
        v,
        "event",
        RawEvent,
        [
            kind,
            reason,
            family,
            proto,
            ifindex,
            target_ifindex,
            identity,
            tunnel_endpoint,
            tunnel_id,
            pkt_len,
            sport,
            dport,
            saddr,
            daddr
        ]
    );
    v
}

/// The key part aya prepends `prefixlen` to must line up with the C key.
#[test]
fn ipcache_key_data_follows_prefixlen() {
    assert_eq!(size_of::<IpcacheKeyData>() + 4, size_of::<IpcacheKey>());
    assert_eq!(
        offset_of!(IpcacheKeyData, family) + 4,
        offset_of!(IpcacheKey, family)
    );
    assert_eq!(
        offset_of!(IpcacheKeyData, addr) + 4,
        offset_of!(IpcacheKey, addr)
    );
}

#[test]
fn c_and_rust_layouts_agree() {
    let compiler = std::env::var("CC").unwrap_or_else(|_| "clang".to_owned());
    if Command::new(&compiler).arg("--version").output().is_err() {
        if std::env::var("MESH_TEST_STRICT").as_deref() == Ok("1") {
            panic!("{compiler} not found (install the Debian package clang)");
        }
        eprintln!("skipping: C compiler `{compiler}` not found (install the Debian package clang)");
        return;
    }
    let expected = rust_layout();
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"datapath.h\"\nint main(void) {\n",
    );
    for (ty, field, _) in &expected {
        if *field == "sizeof" {
            c += &format!("printf(\"{ty} sizeof %zu\\n\", sizeof(struct {ty}));\n");
        } else {
            c += &format!("printf(\"{ty} {field} %zu\\n\", offsetof(struct {ty}, {field}));\n");
        }
    }
    c += "printf(\"abi version %d\\n\", DATAPATH_ABI_VERSION);\n";
    c += "return 0; }\n";

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    let bin = dir.path().join("layout");
    std::fs::write(&src, c).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf");
    let out = Command::new(&compiler)
        .arg(format!("-I{}", include.display()))
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compiling the layout probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&bin).output().unwrap();
    assert!(out.status.success());
    let c_view: BTreeMap<(String, String), usize> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            let (ty, field, n) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
            ((ty.to_owned(), field.to_owned()), n.parse().unwrap())
        })
        .collect();
    assert_eq!(
        c_view[&("abi".to_owned(), "version".to_owned())],
        DATAPATH_ABI_VERSION as usize,
        "DATAPATH_ABI_VERSION differs between datapath.h and abi.rs"
    );
    let mut mismatches = Vec::new();
    for (ty, field, rust) in &expected {
        let c = c_view[&((*ty).to_owned(), (*field).to_owned())];
        if c != *rust {
            mismatches.push(format!("struct {ty}.{field}: C {c}, Rust {rust}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "layout mismatches:\n{}",
        mismatches.join("\n")
    );
    assert_eq!(c_view.len(), expected.len() + 1);
}
