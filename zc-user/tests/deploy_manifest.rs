//! The Kubernetes manifest (deploy/kubernetes/zc-agent.yaml), checked
//! without a cluster: it parses into the fields of the API objects it
//! uses (an unknown or misspelt field fails), its selector matches its
//! pods, every flag it passes exists in `zc agent --help`, mounts, ports
//! and probes line up, and it grants the agent exactly the capabilities
//! the systemd unit does.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Namespace {
    api_version: String,
    kind: String,
    metadata: Meta,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DaemonSet {
    api_version: String,
    kind: String,
    metadata: Meta,
    spec: DaemonSetSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DaemonSetSpec {
    selector: Selector,
    update_strategy: Option<Strategy>,
    template: Template,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Selector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Strategy {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Template {
    metadata: Meta,
    spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodSpec {
    #[serde(rename = "hostPID")]
    host_pid: bool,
    host_network: bool,
    dns_policy: Option<String>,
    priority_class_name: Option<String>,
    termination_grace_period_seconds: Option<u32>,
    #[serde(default)]
    tolerations: Vec<Toleration>,
    containers: Vec<Container>,
    volumes: Vec<Volume>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Toleration {
    operator: String,
    key: Option<String>,
    effect: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Container {
    name: String,
    image: String,
    image_pull_policy: String,
    command: Vec<String>,
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    ports: Vec<Port>,
    liveness_probe: Probe,
    readiness_probe: Probe,
    resources: Resources,
    security_context: SecurityContext,
    volume_mounts: Vec<Mount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Port {
    name: String,
    container_port: u16,
    protocol: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Probe {
    http_get: HttpGet,
    period_seconds: Option<u32>,
    failure_threshold: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpGet {
    path: String,
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resources {
    requests: BTreeMap<String, String>,
    limits: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SecurityContext {
    run_as_user: u32,
    privileged: bool,
    allow_privilege_escalation: bool,
    read_only_root_filesystem: bool,
    capabilities: Capabilities,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Capabilities {
    drop: Vec<String>,
    add: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Mount {
    name: String,
    mount_path: String,
    read_only: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Volume {
    name: String,
    host_path: HostPath,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostPath {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// The manifest's documents, each parsed as the object its `kind` names.
fn load() -> (Namespace, DaemonSet) {
    let path = repo().join("deploy/kubernetes/zc-agent.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let (mut ns, mut ds) = (None, None);
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_norway::Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let fail = |e: serde_norway::Error| -> ! { panic!("{} ({kind}): {e}", path.display()) };
        match kind.as_str() {
            "Namespace" => ns = Some(serde_norway::from_value(value).unwrap_or_else(|e| fail(e))),
            "DaemonSet" => ds = Some(serde_norway::from_value(value).unwrap_or_else(|e| fail(e))),
            other => panic!("unexpected object kind `{other}` in {}", path.display()),
        }
    }
    (
        ns.expect("no Namespace in the manifest"),
        ds.expect("no DaemonSet in the manifest"),
    )
}

/// The value after `flag` in `args`.
fn arg<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("the agent is not given {flag}: {args:?}"));
    args.get(at + 1)
        .unwrap_or_else(|| panic!("{flag} has no value"))
}

#[test]
fn the_daemonset_parses_and_its_parts_line_up() {
    let (ns, ds) = load();
    assert_eq!(
        (ns.api_version.as_str(), ns.kind.as_str()),
        ("v1", "Namespace")
    );
    assert_eq!(
        (ds.api_version.as_str(), ds.kind.as_str()),
        ("apps/v1", "DaemonSet")
    );
    assert_eq!(ds.metadata.namespace, ns.metadata.name, "namespace");
    assert!(ds.metadata.name.is_some());
    if let Some(s) = &ds.spec.update_strategy {
        assert!(
            ["RollingUpdate", "OnDelete"].contains(&s.kind.as_str()),
            "{}",
            s.kind
        );
    }
    // The API server refuses a selector that does not match the template.
    for (k, v) in &ds.spec.selector.match_labels {
        assert_eq!(
            ds.spec.template.metadata.labels.get(k),
            Some(v),
            "selector label {k}"
        );
    }
    let pod = &ds.spec.template.spec;
    assert!(
        pod.host_pid,
        "pairing by pid needs the host's pid namespace"
    );
    assert!(pod.tolerations.iter().all(|t| {
        ["Exists", "Equal"].contains(&t.operator.as_str())
            && (t.operator == "Exists" || t.key.is_some())
            && t.effect
                .as_deref()
                .is_none_or(|e| ["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&e))
    }));
    let _ = (
        &pod.dns_policy,
        &pod.priority_class_name,
        pod.termination_grace_period_seconds,
        pod.host_network,
    );
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert!(!c.name.is_empty() && c.image.contains(':') && !c.image_pull_policy.is_empty());
    assert!(
        c.env
            .iter()
            .all(|e| !e.name.is_empty() && !e.value.is_empty())
    );
    assert!(
        c.resources.requests.contains_key("memory") && c.resources.limits.contains_key("memory")
    );

    // Volumes: each mount names one, once.
    let volumes: BTreeMap<_, _> = pod.volumes.iter().map(|v| (v.name.as_str(), v)).collect();
    assert_eq!(volumes.len(), pod.volumes.len(), "duplicate volume names");
    for m in &c.volume_mounts {
        let v = volumes
            .get(m.name.as_str())
            .unwrap_or_else(|| panic!("mount {} names no volume", m.name));
        assert!(["Directory", "DirectoryOrCreate"].contains(&v.host_path.kind.as_str()));
        assert!(
            m.read_only
                .is_none_or(|ro| !ro || m.mount_path.starts_with("/sys/fs/cgroup"))
        );
    }
    let mounted = |p: &str, what: &str| {
        assert!(
            c.volume_mounts
                .iter()
                .any(|m| Path::new(p).starts_with(&m.mount_path) && m.read_only != Some(true)),
            "{what} {p} is not on a writable host mount"
        );
    };

    // The command line: a real `zc agent`, flags it knows, paths it can use.
    assert_eq!(c.command, ["/usr/bin/zc"], "the image's binary");
    assert_eq!(c.args.first().map(String::as_str), Some("agent"));
    let help = Command::new(env!("CARGO_BIN_EXE_zc"))
        .args(["agent", "--help"])
        .output()
        .expect("running zc agent --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in c.args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(&format!("{flag} ")), "zc agent has no {flag}");
    }
    mounted(
        Path::new(arg(&c.args, "--socket"))
            .parent()
            .and_then(Path::to_str)
            .expect("socket directory"),
        "the control socket's directory",
    );
    let pins = arg(&c.args, "--pin-dir");
    mounted(pins, "the pin directory");
    assert!(
        volumes.values().any(|v| v.host_path.path == "/sys/fs/bpf")
            && pins.starts_with("/sys/fs/bpf/"),
        "pins must live on the host's bpffs to outlive the pod"
    );

    // Metrics: the probes ask /healthz on the port the agent serves.
    let metrics = arg(&c.args, "--metrics");
    let port: u16 = metrics
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("--metrics {metrics} has no port"));
    assert!(
        c.ports
            .iter()
            .any(|p| p.container_port == port && p.protocol == "TCP" && !p.name.is_empty())
    );
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        assert_eq!(
            (probe.http_get.path.as_str(), probe.http_get.port),
            ("/healthz", port)
        );
        let _ = (probe.period_seconds, probe.failure_threshold);
    }

    // Capabilities: exactly the systemd unit's, nothing more, no root.
    let sc = &c.security_context;
    assert!(!sc.privileged && !sc.allow_privilege_escalation && sc.read_only_root_filesystem);
    assert_eq!(
        sc.run_as_user, 0,
        "capabilities are granted to uid 0 in the container"
    );
    assert_eq!(sc.capabilities.drop, ["ALL"]);
    // The unit's set serves proxies on the host; pods need setns too.
    let mut want = unit_capabilities();
    want.insert("CAP_SYS_ADMIN".into());
    let granted: BTreeSet<String> = sc
        .capabilities
        .add
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    assert_eq!(
        granted, want,
        "the DaemonSet is not zc-agent.service's set plus CAP_SYS_ADMIN"
    );
}

/// The capabilities deploy/systemd/zc-agent.service gives the agent.
fn unit_capabilities() -> BTreeSet<String> {
    let path = repo().join("deploy/systemd/zc-agent.service");
    let unit = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

#[test]
fn the_image_recipe_installs_the_binary_the_daemonset_runs() {
    let path = repo().join("deploy/container/Containerfile");
    let recipe = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let (_, ds) = load();
    let c = &ds.spec.template.spec.containers[0];
    assert!(
        recipe.lines().any(|l| l.starts_with("FROM ")),
        "no base image"
    );
    assert!(
        recipe.contains("dpkg -i") && recipe.contains("target/dist/zc_"),
        "the image does not install the package `cargo xtask dist` builds"
    );
    assert!(
        recipe.contains(&format!("ENTRYPOINT [\"{}\"]", c.command[0])),
        "the image's entry point is not the DaemonSet's command {:?}",
        c.command
    );
}
