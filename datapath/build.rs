//! Compiles every `bpf/*.c` into `$OUT_DIR/<name>.o` with clang, so that
//! `src/lib.rs` can embed the objects with `include_bytes_aligned!`, and
//! again with `-DMESH_TEST_PROGRAMS` into `$OUT_DIR/<name>_test.o`: the build
//! with the test-only programs, which only the tests and benchmarks load.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bpf = manifest.join("bpf");
    println!("cargo:rerun-if-changed={}", bpf.display());
    println!("cargo:rerun-if-env-changed=CLANG");

    let mut sources = Vec::new();
    for entry in fs::read_dir(&bpf).unwrap_or_else(|e| panic!("cannot read {}: {e}", bpf.display()))
    {
        let path = entry.expect("readable bpf/ entry").path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("c") => sources.push(path),
            Some("h") => println!("cargo:rerun-if-changed={}", path.display()),
            _ => {}
        }
    }
    sources.sort();

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
        compile(&clang, source, &bpf, &out, None);
        compile(&clang, source, &bpf, &out, Some("MESH_TEST_PROGRAMS"));
    }
}

fn compile(clang: &str, source: &Path, include: &Path, out: &Path, define: Option<&str>) {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_owned());
    let stem = source
        .file_stem()
        .expect("a .c file has a stem")
        .to_string_lossy();
    let name = match define {
        Some(_) => format!("{stem}_test.o"),
        None => format!("{stem}.o"),
    };
    let object = out.join(name);
    // -g: aya needs the BTF that only debug info produces ("no BTF parsed").
    // -I: Debian keeps asm/types.h under the multiarch include directory.
    let status = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{}", include.display()))
        .arg(format!("-I/usr/include/{arch}-linux-gnu"))
        .args(define.map(|d| format!("-D{d}")))
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&object)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed ({s}) compiling {}", source.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{clang}` not found: the datapath's eBPF programs are C compiled with clang; \
             install the Debian package `clang` (apt-get install clang) or set CLANG"
        ),
        Err(e) => panic!("cannot run `{clang}`: {e}"),
    }
}
