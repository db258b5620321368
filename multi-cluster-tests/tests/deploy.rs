//! `deploy/`: what the Kubernetes manifests and Dockerfiles ask of our
//! binaries exists, and the manifests validate against the Kubernetes
//! OpenAPI schemas (no Kubernetes API server can run on these machines, so
//! nothing is applied anywhere; `deploy/README.md`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use multi_cluster_tests::bin_dir;
use serde::Deserialize as _;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

/// Every YAML document under `dir`, with the file it came from.
fn documents(dir: &Path) -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let text = std::fs::read_to_string(&path).unwrap();
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let value = Value::deserialize(doc)
                        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
                    out.push((path.clone(), value));
                }
            }
        }
    }
    out
}

/// Every container-shaped object (`image` and `name`) in `value`.
fn containers<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            if map.contains_key("image") && map.contains_key("name") {
                out.push(value);
            }
            map.values().for_each(|v| containers(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| containers(v, out)),
        _ => {}
    }
}

/// `--help` of `program` (with `subcommand` words before it).
fn help(program: &Path, subcommand: &[&str]) -> String {
    let out = Command::new(program)
        .args(subcommand)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("run {} --help: {e}", program.display()));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// What one container asks of its program: the subcommand words, the
/// flags (`--name` of `--name=value`) and the `MESH_*` variables.
fn asks(container: &Value) -> (Vec<String>, Vec<String>, Vec<String>) {
    let args = strings(&container["args"]);
    let subcommand: Vec<String> = args
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .cloned()
        .collect();
    let flags = args
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or_default().to_owned())
        .collect();
    let env = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .filter(|n| n.starts_with("MESH_"))
        .map(str::to_owned)
        .collect();
    (subcommand, flags, env)
}

#[test]
fn every_flag_and_variable_the_manifests_pass_exists() {
    let programs = ["clustermesh-apiserver", "node-agent", "meshctl"];
    let mut checked = BTreeSet::new();
    for (file, doc) in documents(&repo().join("deploy/kubernetes")) {
        let mut found = Vec::new();
        containers(&doc, &mut found);
        for container in found {
            let image = container["image"].as_str().unwrap_or_default();
            let Some(program) = programs.iter().find(|p| {
                image
                    .rsplit('/')
                    .next()
                    .is_some_and(|i| i.split(':').next() == Some(**p))
            }) else {
                continue;
            };
            if container.get("command").is_some() {
                continue; // a script of the image, not the program
            }
            let path = bin_dir().join(program);
            assert!(
                path.is_file(),
                "{} is not built (cargo build --workspace)",
                path.display()
            );
            let (subcommand, flags, env) = asks(container);
            let words: Vec<&str> = subcommand.iter().map(String::as_str).collect();
            let text = help(&path, &words);
            let name = container["name"].as_str().unwrap_or_default();
            for flag in &flags {
                assert!(
                    text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
                    "{}: container {name} passes {flag}, which `{program} {} --help` does not list:\n{text}",
                    file.display(),
                    subcommand.join(" ")
                );
                checked.insert(format!("{program} {flag}"));
            }
            for var in &env {
                assert!(
                    text.contains(&format!("[env: {var}=")),
                    "{}: container {name} sets {var}, which `{program} --help` does not read:\n{text}",
                    file.display()
                );
                checked.insert(format!("{program} ${var}"));
            }
        }
    }
    for must in [
        "clustermesh-apiserver --source",
        "clustermesh-apiserver --leader-elect",
        "node-agent --source",
        "meshctl --cluster",
    ] {
        assert!(
            checked.contains(must),
            "no manifest passes {must}: {checked:?}"
        );
    }
}

#[test]
fn every_dockerfile_entrypoint_is_a_program_we_build_or_ship() {
    let built = ["clustermesh-apiserver", "node-agent", "meshctl", "mesh-cni"];
    let dir = repo().join("deploy/docker");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".Dockerfile") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines().filter(|l| l.starts_with("ENTRYPOINT")) {
            let words: Vec<String> =
                serde_json::from_str(line.trim_start_matches("ENTRYPOINT").trim()).unwrap_or_else(
                    |e| panic!("{}: ENTRYPOINT in exec form expected: {e}", path.display()),
                );
            let program = Path::new(&words[0])
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            // etcd comes from Debian's etcd-server package.
            assert!(
                built.contains(&program.as_str()) || program == "etcd",
                "{}: ENTRYPOINT {program} is not a program of this workspace",
                path.display()
            );
            if program != "etcd" {
                assert!(
                    text.contains(&format!("/out/{program}")),
                    "{}: {program} is not copied from the build stage",
                    path.display()
                );
            }
            seen += 1;
        }
    }
    assert_eq!(seen, 4, "one ENTRYPOINT per image");
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    // deploy/check.sh needs python3 with venv (kubernetes-validate from
    // PyPI, installed into target/) and shellcheck: `cargo xtask deps`.
    let venv = Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .status()
        .is_ok_and(|s| s.success());
    if !venv
        && !testkit::skip_or_fail("this test needs `python3 -m venv` (Debian package python3-venv)")
    {
        return;
    }
    if !testkit::require_binary("shellcheck") {
        return;
    }
    let out = Command::new("bash")
        .arg(repo().join("deploy/check.sh"))
        .current_dir(repo())
        .output()
        .expect("run deploy/check.sh");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy/check.sh failed:\n{text}");
    assert!(
        text.contains("every object valid for Kubernetes 1.30"),
        "{text}"
    );
}
