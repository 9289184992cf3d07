//! `attrd run` as systemd runs it: a real binary, a real mosquitto, a real hot folder, real photos, real ORT.

use crate::common::{Mosquitto, fashion_rows, free_port, imagenet_bundle, repo};
use crate::mqtt::Sub;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Node {
    dir: tempfile::TempDir,
    name: String,
    config: PathBuf,
    http_port: u16,
}

impl Node {
    fn new(name: &str, mqtt_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let http_port = free_port();
        let config = dir.path().join("attrd.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[engine]
providers = ["cpu"]
[models]
dir = "models"
trusted_keys = ["{key}"]
bootstrap = "{bundle}"
[[sources]]
type = "hotfolder"
dir = "hot"
settle = "100ms"
rescan = "1s"
[outbox]
path = "outbox.sqlite3"
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
node = "{name}"
reconnect_min = "100ms"
reconnect_max = "500ms"
[http]
listen = "127.0.0.1:{http_port}"
"#,
                key = repo().join("config/keys/attrd-demo.pub").display(),
                bundle = imagenet_bundle().display(),
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("hot")).unwrap();
        Node { dir, name: name.into(), config, http_port }
    }

    fn hot(&self) -> PathBuf {
        self.dir.path().join("hot")
    }

    fn start(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_attrd"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("ATTRD_LOG", "info,ort=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("attrd.log")).unwrap())
            .spawn()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("attrd.log")).unwrap_or_default()
    }

    /// Copies real product photos in as `<SKU>_front.jpg`; returns the SKUs.
    fn drop_photos(&self, skus: &[String]) {
        let rows = fashion_rows();
        for (sku, (_, path, _)) in skus.iter().zip(rows.iter().skip(100)) {
            // Written under a dot-name first and renamed, like tethering software does, so no half file is seen.
            let tmp = self.hot().join(format!(".{sku}.part"));
            std::fs::copy(path, &tmp).unwrap();
            std::fs::rename(&tmp, self.hot().join(format!("{sku}_front.jpg"))).unwrap();
        }
    }

    fn files_in(&self, sub: &str) -> BTreeSet<String> {
        let d = if sub.is_empty() { self.hot() } else { self.hot().join(sub) };
        std::fs::read_dir(d)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn skus(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

async fn wait_ready(node: &Node, child: &mut Child) {
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("attrd exited early ({status}):\n{}", node.log());
        }
        if std::net::TcpStream::connect(("127.0.0.1", node.http_port)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("attrd did not become ready:\n{}", node.log());
}

fn results_by_sku(sub: &Sub, node: &str) -> BTreeMap<String, BTreeSet<String>> {
    let prefix = format!("attrd/{node}/results/");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in sub.messages().iter().filter(|m| m.topic.starts_with(&prefix)) {
        let v = m.json();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["node"], node);
        assert_eq!(v["model"]["execution_provider"], "cpu");
        assert!(v["attributes"]["imagenet"]["topk"].as_array().is_some_and(|t| t.len() == 5), "{v}");
        out.entry(v["sku"].as_str().unwrap().to_string()).or_default().insert(v["message_id"].as_str().unwrap().into());
    }
    out
}

/// The hot-folder path end to end, including `kill -9` in the middle of a stream: every photo yields a result on
/// MQTT, every file ends in `done/`, nothing is lost; SIGTERM then says `stopped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_folder_to_mqtt_survives_kill_9_and_stops_gracefully() {
    let broker = Mosquitto::start();
    let node = Node::new("it-daemon", broker.port);
    let sub = Sub::start(
        broker.port,
        "it-daemon-sub",
        &[&format!("attrd/{}/results/#", node.name), &format!("attrd/{}/available", node.name)],
        false,
    )
    .await;

    // Photos already waiting when the daemon starts are processed.
    let first = skus("PRE", 6);
    node.drop_photos(&first);
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    sub.wait_for("results for the pre-existing photos", 60, |_| results_by_sku(&sub, &node.name).len() >= first.len())
        .await;

    // A stream of photos, and the daemon killed without warning in the middle of it.
    let second = skus("RUN", 12);
    node.drop_photos(&second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = node.start();
    wait_ready(&node, &mut child).await;

    let all: BTreeSet<String> = first.iter().chain(&second).cloned().collect();
    sub.wait_for("a result for every photo after the restart", 90, |_| {
        results_by_sku(&sub, &node.name).keys().cloned().collect::<BTreeSet<_>>() == all
    })
    .await;
    // A photo processed again after the kill carries the same message_id: one id per photo, however often it arrives.
    for (sku, ids) in results_by_sku(&sub, &node.name) {
        assert_eq!(ids.len(), 1, "{sku} has results with different message_ids: {ids:?}");
    }
    let done: BTreeSet<String> =
        node.files_in("done").iter().map(|f| f.trim_end_matches("_front.jpg").to_string()).collect();
    for _ in 0..100 {
        if node.files_in("").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.files_in("").is_empty(), "files left in the hot folder: {:?}", node.files_in(""));
    assert!(node.files_in("failed").is_empty(), "{:?}\n{}", node.files_in("failed"), node.log());
    let done_now: BTreeSet<String> =
        node.files_in("done").iter().map(|f| f.trim_end_matches("_front.jpg").to_string()).collect();
    assert!(done.is_subset(&done_now));
    assert_eq!(done_now, all, "every file ends in done/");

    // Graceful stop: exit 0 and a retained `stopped`.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "exit status {status}:\n{}", node.log());
    sub.wait_for("available=stopped", 10, |m| {
        m.iter().any(|m| m.topic == format!("attrd/{}/available", node.name) && m.text() == "stopped")
    })
    .await;
}

/// A configuration mistake is reported with the key at fault, before anything starts.
#[test]
fn config_errors_are_specific() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("[mqtt]\nhots = \"x\"\n", "unknown field `hots`"),
        ("[models]\ntrusted_keys = []\n", "trusted_keys is empty"),
        ("[[sources]]\ntype = \"ftp\"\n", "unknown variant `ftp`"),
        ("[pipeline]\nmax_batch = 0\n", "max_batch"),
        ("[engine]\nproviders = [\"opencl\"]\n", "opencl"),
    ];
    let key = repo().join("config/keys/attrd-demo.pub");
    for (i, (body, expect)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("c{i}.toml"));
        let keys = if body.contains("trusted_keys") {
            String::new()
        } else {
            format!("[models]\ntrusted_keys = [\"{}\"]\n", key.display())
        };
        std::fs::write(&path, format!("{keys}{body}")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_attrd"))
            .args(["config", "check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{body}: accepted");
        assert!(err.contains(expect), "{body}: {err:?} does not mention {expect:?}");
    }
    // The demo configuration is valid as shipped.
    let out = Command::new(env!("CARGO_BIN_EXE_attrd"))
        .args(["config", "check", "--config"])
        .arg(repo().join("config/demo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Commands over MQTT: a capture with no cameras configured and a malformed one both get a specific reply; the daemon
/// keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_commands_get_replies_and_bad_ones_do_not_hurt() {
    let broker = Mosquitto::start();
    let node = Node::new("it-cmd", broker.port);
    let sub = Sub::start(broker.port, "it-cmd-sub", &[&format!("attrd/{}/cmd/+/response", node.name)], false).await;
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    // The publisher subscribes right after connecting; give it a moment before sending.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let send = |payload: &str| {
        let st = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1", "-t"])
            .arg(format!("attrd/{}/cmd/capture", node.name))
            .args(["-m", payload])
            .status()
            .unwrap();
        assert!(st.success());
    };
    send(r#"{"sku": "SKU-1"}"#);
    send("{not json");
    send(r#"{"sku": "a/b#c"}"#);
    let topic = format!("attrd/{}/cmd/capture/response", node.name);
    let replies = sub.wait_for("three replies", 15, |m| m.iter().filter(|m| m.topic == topic).count() >= 3).await;
    let texts: Vec<String> = replies.iter().filter(|m| m.topic == topic).map(|m| m.text()).collect();
    assert!(texts.iter().any(|t| t.contains("no cameras are configured")), "{texts:#?}");
    assert!(texts.iter().all(|t| t.contains("\"ok\":false")), "{texts:#?}");
    assert!(texts.len() >= 3, "{texts:#?}");
    assert!(child.try_wait().unwrap().is_none(), "attrd died:\n{}", node.log());
    child.kill().unwrap();
    let _ = child.wait();
}
