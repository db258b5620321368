#!/usr/bin/env python3
"""Offline checks of deploy/: no Kubernetes API server, no kustomize binary.

1. Every document of every YAML file under deploy/kubernetes (except the
   kustomization files and the patches they name) is validated against the
   Kubernetes OpenAPI schemas with kubernetes-validate, strictly (unknown
   fields are errors).
2. The base and every overlay are rendered with the small subset of Kustomize
   that they use (resources, patches as strategic merge or JSON 6902, images)
   and every rendered object is validated the same way. A kustomization or
   patch outside that subset is an error, not a silent approximation.
3. The rendered workloads are linted for what schemas cannot see and the API
   server or the kubelet would refuse or get wrong: volume mounts without a
   volume, Bidirectional propagation outside privileged containers, $(VAR)
   references to undefined variables, ConfigMap keys that do not exist,
   Services that select no pod port, and flags of the mesh's own binaries not
   written as one `--flag=value` (or `--flag`) list item each.
4. The kind configs under deploy/kind: pod and service ranges that overlap
   nothing, and the numbering deploy/kind/up.sh relies on.

`--kustomization DIR` adds kustomizations from elsewhere to steps 2 and 3
(check.sh passes the overlays that deploy/kind/up.sh writes).

Prints each file and object it checks and every problem; exits 1 on any.
"""

import argparse
import copy
import ipaddress
import pathlib
import re
import sys

import kubernetes_validate
import yaml

# The images of the mesh's own binaries, and what their entrypoint runs.
MESH_BINARIES = {"node-agent", "clustermesh-apiserver", "meshctl"}
# Kustomization fields this renderer implements.
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
# Lists that a strategic merge patch merges by `name` (their patchMergeKey);
# any other list of objects in a patch must be changed with JSON 6902.
MERGE_BY_NAME = {"containers", "initContainers", "ephemeralContainers", "volumes", "env"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


class Problem(Exception):
    """A check failed; the message says where and why."""


def load_yaml_docs(path):
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise Problem(f"{path}: not valid YAML: {e}") from e


def ident(obj):
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    where = f"{ns}/" if ns else ""
    return f"{obj.get('kind')}/{where}{meta.get('name')}"


# --- rendering -------------------------------------------------------------


class Rendered:
    def __init__(self):
        self.objects = []  # (object, origin file)
        self.patch_files = set()


def split_group_version(api_version):
    if "/" in api_version:
        return tuple(api_version.split("/", 1))
    return "", api_version


def matches(obj, target):
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unsupported:
        raise Problem(f"patch target fields {sorted(unsupported)} are not supported")
    group, version = split_group_version(obj.get("apiVersion", ""))
    meta = obj.get("metadata") or {}
    checks = {
        "group": group,
        "version": version,
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    return all(checks[k] == v for k, v in target.items())


def strategic_merge(base, patch, path):
    if isinstance(base, dict) and isinstance(patch, dict):
        for key, value in patch.items():
            if key.startswith("$"):
                raise Problem(f"{path}.{key}: patch directives are not supported")
            if value is None:
                base.pop(key, None)
            elif key in base:
                base[key] = strategic_merge(base[key], value, f"{path}.{key}")
            else:
                base[key] = copy.deepcopy(value)
        return base
    if isinstance(patch, list) and any(isinstance(x, dict) for x in patch):
        field = path.rsplit(".", 1)[-1]
        if field not in MERGE_BY_NAME or not isinstance(base, list):
            raise Problem(f"{path}: merging this list is not supported; use a JSON 6902 patch")
        merged = list(base)
        for item in patch:
            if not isinstance(item, dict) or "name" not in item:
                raise Problem(f"{path}: every item of a merged list needs a name")
            for i, existing in enumerate(merged):
                if existing.get("name") == item["name"]:
                    merged[i] = strategic_merge(existing, item, f"{path}[{item['name']}]")
                    break
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise Problem(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(obj, ops, origin):
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in {"add", "replace", "remove", "test"}:
            raise Problem(f"{origin}: unsupported JSON 6902 operation {op!r}")
        *parents, last = pointer(op["path"]) or [None]
        if last is None:
            raise Problem(f"{origin}: the whole document cannot be patched")
        node = obj
        for part in parents:
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError) as e:
                raise Problem(f"{origin}: {op['path']}: no such path ({e})") from e
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                if index > len(node):
                    raise Problem(f"{origin}: {op['path']}: index out of range")
                node.insert(index, copy.deepcopy(op["value"]))
                continue
            if index >= len(node):
                raise Problem(f"{origin}: {op['path']}: index out of range")
        elif not isinstance(node, dict):
            raise Problem(f"{origin}: {op['path']}: parent is not an object or a list")
        elif kind != "add" and last not in node:
            raise Problem(f"{origin}: {op['path']}: no such path")
        else:
            index = last
        if kind in {"add", "replace"}:
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        elif node[index] != op["value"]:
            raise Problem(f"{origin}: {op['path']}: test failed")


def pod_spec(obj):
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return spec
    template = spec.get("template") or {}
    return template.get("spec")


def containers_of(spec):
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or []:
            yield field, c


def set_images(objects, images, origin):
    for entry in images:
        unsupported = set(entry) - {"name", "newName", "newTag", "digest"}
        if unsupported or "name" not in entry:
            raise Problem(f"{origin}: images entry {entry!r} is not supported")
        for obj, _ in objects:
            spec = pod_spec(obj)
            if not spec:
                continue
            for _, c in containers_of(spec):
                image = c.get("image", "")
                name = image.split("@", 1)[0]
                tag = None
                if ":" in name.rsplit("/", 1)[-1]:
                    name, tag = name.rsplit(":", 1)
                if name != entry["name"]:
                    continue
                name = entry.get("newName", name)
                if "digest" in entry:
                    c["image"] = f"{name}@{entry['digest']}"
                else:
                    tag = entry.get("newTag", tag)
                    c["image"] = f"{name}:{tag}" if tag else name


def render(directory, rendered, seen=()):
    directory = directory.resolve()
    if directory in seen:
        raise Problem(f"{directory}: kustomization cycle")
    kfile = directory / "kustomization.yaml"
    docs = load_yaml_docs(kfile)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise Problem(f"{kfile}: expected one mapping")
    kust = docs[0]
    unsupported = set(kust) - KUSTOMIZATION_FIELDS
    if unsupported:
        raise Problem(f"{kfile}: fields {sorted(unsupported)} are not supported by this renderer")
    objects = []
    for entry in kust.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path, rendered, seen + (directory,)))
        elif path.is_file():
            for doc in load_yaml_docs(path):
                objects.append((doc, path))
        else:
            raise Problem(f"{kfile}: resource {entry!r} does not exist")
    for patch in kust.get("patches") or []:
        unsupported = set(patch) - {"path", "target"}
        if unsupported or "path" not in patch:
            raise Problem(f"{kfile}: patch {patch!r}: only `path` and `target` are supported")
        ppath = (directory / patch["path"]).resolve()
        rendered.patch_files.add(ppath)
        pdocs = load_yaml_docs(ppath)
        target = patch.get("target")
        if len(pdocs) == 1 and isinstance(pdocs[0], list):
            if not target:
                raise Problem(f"{ppath}: a JSON 6902 patch needs a target")
            hits = [o for o, _ in objects if matches(o, target)]
            if not hits:
                raise Problem(f"{ppath}: target {target} matches nothing")
            for obj in hits:
                json_patch(obj, pdocs[0], ppath)
            continue
        for pdoc in pdocs:
            if not isinstance(pdoc, dict) or "kind" not in pdoc:
                raise Problem(f"{ppath}: a strategic merge patch is an object with a kind")
            group, version = split_group_version(pdoc.get("apiVersion", ""))
            own = {"group": group, "version": version, "kind": pdoc["kind"],
                   "name": (pdoc.get("metadata") or {}).get("name")}
            hits = [o for o, _ in objects if matches(o, target or own)]
            if len(hits) != 1:
                raise Problem(f"{ppath}: {ident(pdoc)} matches {len(hits)} objects, not one")
            strategic_merge(hits[0], pdoc, ident(pdoc))
    set_images(objects, kust.get("images") or [], kfile)
    return objects


# --- lints -------------------------------------------------------------------


FLAG = re.compile(r"^--[a-z0-9][a-z0-9-]*(=.*)?$")
WORD = re.compile(r"^[a-z][a-z-]*$")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def binary_of(image):
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def lint_args(where, container):
    binary = binary_of(container.get("image", ""))
    if binary not in MESH_BINARIES:
        return
    args = container.get("args") or []
    command = container.get("command")
    if command is not None:
        # A script of the image, run without arguments.
        if len(command) != 1 or not command[0].startswith("/") or args:
            raise Problem(f"{where}: `command` must be one absolute path without args")
        return
    seen_flag = False
    for arg in args:
        if not isinstance(arg, str):
            raise Problem(f"{where}: argument {arg!r} is not a string")
        if FLAG.match(arg):
            seen_flag = True
        elif WORD.match(arg) and not seen_flag and binary == "meshctl":
            continue  # a subcommand, before any flag
        else:
            raise Problem(f"{where}: argument {arg!r} is not `--flag=value` or `--flag`")


def lint_pod(obj, configmaps):
    spec = pod_spec(obj)
    if not spec:
        return
    volumes = {v["name"] for v in spec.get("volumes") or []}
    for field, c in containers_of(spec):
        where = f"{ident(obj)} {field}/{c.get('name')}"
        lint_args(where, c)
        sc = c.get("securityContext") or {}
        caps = set((sc.get("capabilities") or {}).get("add") or [])
        privileged = sc.get("privileged") is True
        if sc.get("allowPrivilegeEscalation") is False and (privileged or "SYS_ADMIN" in caps):
            raise Problem(f"{where}: allowPrivilegeEscalation false with privileged or SYS_ADMIN is refused")
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes:
                raise Problem(f"{where}: mounts undefined volume {m['name']!r}")
            if m.get("mountPropagation") == "Bidirectional" and not privileged:
                raise Problem(f"{where}: Bidirectional propagation needs a privileged container")
        env = c.get("env") or []
        defined = {e["name"] for e in env}
        for text in (c.get("command") or []) + (c.get("args") or []):
            for var in VAR_REF.findall(text):
                if var not in defined:
                    raise Problem(f"{where}: $({var}) is not an env variable of the container")
        for e in env:
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            if not ref or ref.get("optional"):
                continue
            data = configmaps.get((obj["metadata"].get("namespace"), ref["name"]))
            if data is None or ref["key"] not in data:
                raise Problem(f"{where}: env {e['name']}: ConfigMap {ref['name']} has no key {ref['key']!r}")


def lint_service(svc, objects):
    ns = svc["metadata"].get("namespace")
    selector = (svc.get("spec") or {}).get("selector") or {}
    pods = []
    for obj, _ in objects:
        spec = pod_spec(obj)
        if spec is None or obj["metadata"].get("namespace") != ns:
            continue
        labels = ((obj["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            pods.append(spec)
    if not pods:
        raise Problem(f"{ident(svc)}: selects no pod template")
    for port in svc["spec"].get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        for spec in pods:
            declared = {(p.get("name"), p["containerPort"]) for _, c in containers_of(spec)
                        for p in c.get("ports") or []}
            if not any(target in pair for pair in declared):
                raise Problem(f"{ident(svc)}: targetPort {target!r} is no container port of the pods it selects")


def lint(objects):
    seen = set()
    for obj, origin in objects:
        key = ident(obj)
        if key in seen:
            raise Problem(f"{origin}: {key} is defined twice")
        seen.add(key)
        if obj.get("kind") not in CLUSTER_SCOPED and not obj["metadata"].get("namespace"):
            raise Problem(f"{origin}: {key} has no namespace")
    configmaps = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o.get("data") or {}
                  for o, _ in objects if o.get("kind") == "ConfigMap"}
    for obj, _ in objects:
        lint_pod(obj, configmaps)
        if obj.get("kind") == "Service":
            lint_service(obj, objects)


# --- kind configs --------------------------------------------------------------


def check_kind(kind_dir):
    ranges = []
    for path in sorted(kind_dir.glob("*.yaml")):
        docs = load_yaml_docs(path)
        if len(docs) != 1 or docs[0].get("kind") != "Cluster":
            raise Problem(f"{path}: expected one kind Cluster")
        cfg = docs[0]
        if cfg.get("apiVersion") != "kind.x-k8s.io/v1alpha4":
            raise Problem(f"{path}: apiVersion must be kind.x-k8s.io/v1alpha4")
        net = cfg.get("networking") or {}
        if net.get("disableDefaultCNI") is not True:
            raise Problem(f"{path}: networking.disableDefaultCNI must be true")
        nets = {}
        for field in ("podSubnet", "serviceSubnet"):
            try:
                nets[field] = [ipaddress.ip_network(s.strip()) for s in str(net[field]).split(",")]
            except (KeyError, ValueError) as e:
                raise Problem(f"{path}: networking.{field}: {e}") from e
            families = sorted(n.version for n in nets[field])
            want = [4, 6] if net.get("ipFamily") == "dual" else None
            if want and families != want:
                raise Problem(f"{path}: networking.{field} needs one IPv4 and one IPv6 range")
            ranges.extend((n, f"{path.name} {field}") for n in nets[field])
        m = re.fullmatch(r"c(\d+)\.yaml", path.name)
        if m:
            n = int(m.group(1))
            v4 = {f: next(x for x in nets[f] if x.version == 4) for f in nets}
            expect = {"podSubnet": f"10.{n}.0.0/16", "serviceSubnet": f"10.{100 + n}.0.0/16"}
            for field, cidr in expect.items():
                if str(v4[field]) != cidr:
                    raise Problem(f"{path}: {field} IPv4 must be {cidr} (deploy/kind/up.sh derives addresses from it)")
            if cfg.get("name") != f"mesh-c{n}":
                raise Problem(f"{path}: name must be mesh-c{n}")
        print(f"ok    {path}")
    for i, (a, wa) in enumerate(ranges):
        for b, wb in ranges[i + 1:]:
            if a.version == b.version and a.overlaps(b):
                raise Problem(f"kind: {wa} {a} overlaps {wb} {b}")
    print(f"ok    kind: {len(ranges)} pod and service ranges, none overlapping")


# --- main ----------------------------------------------------------------------


def validate(obj, origin, version, errors):
    if not isinstance(obj, dict) or not obj.get("kind") or not obj.get("apiVersion"):
        errors.append(f"{origin}: a document is not a Kubernetes object (a patch no kustomization names?)")
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
        print(f"ok    {origin}: {ident(obj)}")
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        errors.append(f"{origin}: {ident(obj)}: {path}: {e.message}")
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        errors.append(f"{origin}: {ident(obj)}: {e.message}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", default="1.30.0")
    parser.add_argument("--kustomization", type=pathlib.Path, action="append", default=[],
                        help="also render and check this kustomization directory")
    parser.add_argument("deploy", type=pathlib.Path, help="the deploy/ directory")
    args = parser.parse_args()
    k8s = args.deploy / "kubernetes"
    errors = []

    def attempt(what, fn):
        try:
            fn()
        except Problem as e:
            errors.append(f"{what}: {e}")

    rendered = Rendered()
    roots = sorted(p.parent for p in k8s.rglob("kustomization.yaml")) + args.kustomization
    # Patch files are known before rendering, so that a kustomization that
    # fails to render does not get its patches validated as objects.
    for root in roots:
        try:
            for doc in load_yaml_docs(root / "kustomization.yaml"):
                for patch in (doc.get("patches") or []) if isinstance(doc, dict) else []:
                    if isinstance(patch, dict) and "path" in patch:
                        rendered.patch_files.add((root / patch["path"]).resolve())
        except Problem as e:
            errors.append(str(e))
    outputs = {}
    for root in roots:
        def go(root=root):
            outputs[root] = render(root, rendered)
        attempt(f"render {root}", go)

    # (1) Every file on its own, but the kustomizations and their patches.
    for path in sorted(k8s.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in rendered.patch_files:
            print(f"skip  {path} (kustomization or patch)")
            continue
        try:
            docs = load_yaml_docs(path)
        except Problem as e:
            errors.append(str(e))
            continue
        print(f"file  {path}: {len(docs)} objects")
        for doc in docs:
            validate(doc, path, args.kubernetes_version, errors)

    # (2, 3) Every kustomization, rendered.
    for root, objects in outputs.items():
        print(f"build {root}: {len(objects)} objects")
        for obj, _ in objects:
            validate(obj, f"{root} (rendered)", args.kubernetes_version, errors)
        attempt(f"lint {root}", lambda objects=objects: lint(objects))

    # (4) The kind configs.
    attempt("kind", lambda: check_kind(args.deploy / "kind"))

    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problems in {args.deploy}", file=sys.stderr)
        return 1
    print(f"manifests: {len(roots)} kustomizations rendered, every object valid for Kubernetes {args.kubernetes_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
