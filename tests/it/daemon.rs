//! `attrd run` as systemd runs it: a real binary, a real mosquitto, a real hot folder, real photos, real ORT.

use crate::common::{Mosquitto, fashion_rows, free_port, imagenet_bundle, repo};
use crate::mqtt::Sub;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One node's state directory and configuration (also used by `soak`).
pub(crate) struct Node {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) name: String,
    pub(crate) config: PathBuf,
    pub(crate) http_port: u16,
}

impl Node {
    fn new(name: &str, mqtt_port: u16) -> Self {
        Self::with_models(name, mqtt_port, "")
    }

    /// `models_extra`: more lines for the `[models]` table.
    fn with_models(name: &str, mqtt_port: u16, models_extra: &str) -> Self {
        Self::with_tables(name, mqtt_port, "providers = [\"cpu\"]", models_extra)
    }

    /// `engine`: the `[engine]` table's lines; `models_extra`: more lines for `[models]`.
    fn with_tables(name: &str, mqtt_port: u16, engine: &str, models_extra: &str) -> Self {
        Self::build(name, mqtt_port, engine, models_extra, &imagenet_bundle())
    }

    /// A node that bootstraps `bundle` instead of the ImageNet one (the soak uses the faster default fashion model).
    pub(crate) fn with_bundle(name: &str, mqtt_port: u16, bundle: &Path) -> Self {
        Self::build(name, mqtt_port, "providers = [\"cpu\"]", "", bundle)
    }

    fn build(name: &str, mqtt_port: u16, engine: &str, models_extra: &str, bundle: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let http_port = free_port();
        let config = dir.path().join("attrd.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[engine]
{engine}
[models]
dir = "models"
trusted_keys = ["{key}"]
bootstrap = "{bundle}"
{models_extra}
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
                bundle = bundle.display(),
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("hot")).unwrap();
        Node { dir, name: name.into(), config, http_port }
    }

    pub(crate) fn hot(&self) -> PathBuf {
        self.dir.path().join("hot")
    }

    /// Starts `attrd run`; its log is appended to `attrd.log`, so the log of every start survives a restart.
    pub(crate) fn start(&self) -> Daemon {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("attrd.log")).unwrap();
        Daemon(
            Command::new(env!("CARGO_BIN_EXE_attrd"))
                .args(["run", "--config"])
                .arg(&self.config)
                .env("ATTRD_LOG", "info,ort=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("attrd.log")).unwrap_or_default()
    }

    /// Copies real product photos in as `<SKU>_front.jpg`; returns the SKUs.
    pub(crate) fn drop_photos(&self, skus: &[String]) {
        let rows = fashion_rows();
        for (sku, (_, path, _)) in skus.iter().zip(rows.iter().skip(100)) {
            // Written under a dot-name first and renamed, like tethering software does, so no half file is seen.
            let tmp = self.hot().join(format!(".{sku}.part"));
            std::fs::copy(path, &tmp).unwrap();
            std::fs::rename(&tmp, self.hot().join(format!("{sku}_front.jpg"))).unwrap();
        }
    }

    pub(crate) fn files_in(&self, sub: &str) -> BTreeSet<String> {
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

/// The daemon process; killed when dropped, so a failing test does not leave it running.
pub(crate) struct Daemon(pub(crate) Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn skus(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

async fn wait_ready(node: &Node, child: &mut Child) {
    wait_ready_within(node, child, 15).await
}

/// Waits until the node's HTTP port accepts connections; panics with the log if it exits or `secs` pass.
pub(crate) async fn wait_ready_within(node: &Node, child: &mut Child, secs: u64) {
    for _ in 0..secs * 20 {
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
        // Checked with the rest, so `config check` and a SIGHUP refuse them instead of a restart failing.
        ("[http]\nmax_concurrent_infer = 0\n", "max_concurrent_infer is 0"),
        ("[http]\ntoken = \"a\"\ntoken_file = \"b\"\n", "both set"),
        ("[http]\ntoken_file = \"no-such-token\"\n", "no-such-token"),
        ("[log]\nfilter = \"attrd=debg\"\n", "log.filter \"attrd=debg\""),
        // Accepted before, and then failed (or misbehaved) only when a reload had already stopped the running daemon.
        ("[outbox]\nmax_messages = 0\n", "max_messages and max_bytes must be greater than 0"),
        ("[outbox]\nmax_bytes = 1000\n", "outbox.max_bytes must be at least 65536"),
        ("[mqtt]\nusername = \"u\"\npassword_file = \"no-such-password\"\n", "no-such-password"),
        ("[mqtt]\nkeep_alive = \"0s\"\n", "keep_alive"),
        ("[mqtt]\nnode = \"models\"\n", "choose another node name"),
        ("[http]\ncapture_timeout = \"0s\"\n", "capture_timeout is 0"),
        ("[http]\nheader_timeout = \"0s\"\n", "header_timeout is 0"),
        ("[engine]\nsessions = 0\n", "engine.sessions is 0, must be 1 to 64"),
        ("shutdown_timeout = \"0s\"\n", "shutdown_timeout must be greater than 0"),
        ("[demo]\nseed_hotfolder = \"photos\"\n", "no hot folder is configured"),
        ("[[sources]]\ntype = \"hotfolder\"\ndir = \"in\"\nsku_pattern = \"^(.+)$\"\n", "sku"),
        ("[[sources]]\ntype = \"hotfolder\"\ndir = \"in\"\ndone_dir = \"in\"\n", "is the hot folder itself"),
        (
            "[[sources]]\ntype = \"hotfolder\"\nname = \"a\"\ndir = \"in\"\n\
             [[sources]]\ntype = \"hotfolder\"\nname = \"b\"\ndir = \"in\"\n",
            "b watches the same folder",
        ),
        (
            "[[sources]]\ntype = \"hotfolder\"\nname = \"a\"\ndir = \"in\"\n\
             [[sources]]\ntype = \"hotfolder\"\nname = \"b\"\ndir = \"in/done\"\n",
            "is another source's hot folder",
        ),
    ];
    let key = repo().join("config/keys/attrd-demo.pub");
    for (i, (body, expect)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("c{i}.toml"));
        let keys = if body.contains("trusted_keys") {
            String::new()
        } else {
            format!("[models]\ntrusted_keys = [\"{}\"]\n", key.display())
        };
        // Top-level keys go before the first table.
        let text = if body.starts_with('[') { format!("{keys}{body}") } else { format!("{body}{keys}") };
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_attrd"))
            .args(["config", "check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{body}: accepted");
        assert!(err.contains(expect), "{body}: {err:?} does not mention {expect:?}");
    }
    // A relative token file is found next to the configuration, wherever attrd runs from.
    std::fs::write(tmp.path().join("http-token"), "s3cret\n").unwrap();
    let path = tmp.path().join("relative.toml");
    let keys = format!("[models]\ntrusted_keys = [\"{}\"]\n", key.display());
    std::fs::write(&path, format!("{keys}[http]\ntoken_file = \"http-token\"\n")).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_attrd")).args(["config", "check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Two sources may share a folder when they take different kinds of file.
    let shared = tmp.path().join("shared.toml");
    std::fs::write(
        &shared,
        format!(
            "{keys}[[sources]]\ntype = \"hotfolder\"\nname = \"jpegs\"\ndir = \"in\"\nextensions = [\"jpg\"]\n\
             [[sources]]\ntype = \"hotfolder\"\nname = \"pngs\"\ndir = \"in\"\nextensions = [\"png\"]\n"
        ),
    )
    .unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_attrd")).args(["config", "check", "--config"]).arg(&shared).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A bad ATTRD_LOG is an error too, not a silent fallback.
    let out = Command::new(env!("CARGO_BIN_EXE_attrd"))
        .args(["config", "check", "--config"])
        .arg(&path)
        .env("ATTRD_LOG", "attrd=debg")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("ATTRD_LOG") && err.contains("debg"), "{err}");
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

fn demo_signing_key() -> ed25519_dalek::SigningKey {
    attrd::bundle::read_signing_key(&repo().join("config/keys/attrd-demo.key")).unwrap()
}

async fn ship(port: u16, bundle_dir: &std::path::Path) -> attrd::mqtt::transfer::ShipReport {
    let cfg = attrd::mqtt::MqttConfig {
        host: "127.0.0.1".into(),
        port,
        node: Some("it-shipper".into()),
        ..Default::default()
    };
    let opts = attrd::mqtt::transfer::ShipOptions { chunk_size: 512 * 1024, ..Default::default() };
    let bundle = attrd::bundle::Bundle::open(bundle_dir).unwrap();
    let mut last = (0, 0);
    let report = attrd::mqtt::transfer::ship(&cfg, &bundle, &opts, |a, b| last = (a, b)).await.unwrap();
    assert_eq!(last.0, last.1, "progress reaches the total");
    assert!(last.1 > 10, "an 18 MB bundle in 512 KiB chunks: {last:?}");
    report
}

fn transfer_states(sub: &Sub, node: &str) -> Vec<serde_json::Value> {
    let topic = format!("attrd/{node}/model/state");
    sub.messages().iter().filter(|m| m.topic == topic).map(|m| m.json()).collect()
}

/// Each `model/state`'s transfer as (name, status), in the order published.
fn transfer_steps(sub: &Sub, node: &str) -> Vec<(String, String)> {
    transfer_states(sub, node)
        .iter()
        .filter(|v| v["transfer"].is_object())
        .map(|v| {
            let t = &v["transfer"];
            (t["name"].as_str().unwrap().to_string(), t["status"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Bundles shipped over MQTT: one retained before the node starts is fetched, verified, self-tested and activated;
/// an untrusted one and one that fails its golden set are refused while the active model keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_shipped_over_mqtt_are_verified_and_activated() {
    let broker = Mosquitto::start();
    let node = Node::with_models("it-ship", broker.port, "receive = [\"*\"]\nreceive_timeout = \"20s\"");
    let work = tempfile::tempdir().unwrap();
    use crate::models::{test_key, variant};
    let key = demo_signing_key();

    // Shipped while the node is not running: the retained announcement and chunks wait on the broker.
    let good = variant(work.path(), "2.0.0", Some(&key), 0.0);
    let shipped = ship(broker.port, &good).await;
    assert_eq!(shipped.topic, "attrd/models/imagenet-lite0");

    let sub = Sub::start(
        broker.port,
        "it-ship-sub",
        &[&format!("attrd/{}/model/state", node.name), &format!("attrd/{}/results/#", node.name)],
        false,
    )
    .await;
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    let states = sub
        .wait_for("the shipped bundle activated", 90, |_| {
            transfer_states(&sub, &node.name).iter().any(|v| v["transfer"]["status"] == "activated")
        })
        .await;
    let _ = states;
    let last = transfer_states(&sub, &node.name).pop().unwrap();
    assert_eq!(last["model"]["version"], "2.0.0", "{last}");
    assert_eq!(last["transfer"]["sha256"], shipped.announcement.sha256.as_str());
    assert!(last["self_test"]["golden_items"].as_u64().unwrap() > 0, "{last}");

    // Signed by a key this node does not trust.
    let untrusted = variant(work.path(), "3.0.0", Some(&test_key()), 0.0);
    ship(broker.port, &untrusted).await;
    sub.wait_for("the untrusted bundle rejected", 60, |_| {
        transfer_states(&sub, &node.name)
            .iter()
            .any(|v| v["transfer"]["version"] == "3.0.0" && v["transfer"]["status"] == "rejected")
    })
    .await;
    let last = transfer_states(&sub, &node.name).pop().unwrap();
    let err = last["transfer"]["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("trusted"), "{err}");
    assert_eq!(last["model"]["version"], "2.0.0");

    // Properly signed, but its golden outputs do not match what the model computes here.
    let skewed = variant(work.path(), "4.0.0", Some(&key), 0.2);
    let latest = ship(broker.port, &skewed).await;
    assert!(latest.replaced.as_deref().is_some_and(|r| r.contains("3.0.0")), "{:?}", latest.replaced);
    sub.wait_for("the bundle failing its golden set rejected", 90, |_| {
        transfer_states(&sub, &node.name)
            .iter()
            .any(|v| v["transfer"]["version"] == "4.0.0" && v["transfer"]["status"] == "rejected")
    })
    .await;
    let last = transfer_states(&sub, &node.name).pop().unwrap();
    let err = last["transfer"]["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("not activated") && err.contains("self-test"), "{err}");
    assert_eq!(last["model"]["version"], "2.0.0");

    // Still serving, with the received model.
    node.drop_photos(&skus("SHIP", 1));
    sub.wait_for("a result from the received model", 60, |m| {
        m.iter().any(|m| m.topic.contains("/results/") && m.json()["model"]["version"] == "2.0.0")
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "attrd died:\n{}", node.log());
    child.kill().unwrap();
    let _ = child.wait();

    // Each upload cleared the chunks of the one it replaced: only the latest upload's chunks stay retained.
    let fleet = Sub::start(broker.port, "it-ship-fleet", &["attrd/models/#"], false).await;
    let held = fleet
        .wait_for("the retained upload", 10, |m| {
            m.iter().filter(|m| m.topic.contains("/chunks/")).count() == latest.announcement.chunks.len()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let chunk_topics: BTreeSet<String> =
        fleet.messages().iter().filter(|m| m.topic.contains("/chunks/")).map(|m| m.topic.clone()).collect();
    assert_eq!(chunk_topics.len(), latest.announcement.chunks.len(), "{chunk_topics:?}");
    assert!(chunk_topics.iter().all(|t| t.contains(&latest.announcement.transfer)), "{chunk_topics:?}");
    assert!(held.iter().all(|m| m.retain));
}

/// Transfers together hold at most `models.receive_max_bytes` in memory: with room for one bundle, two announced at
/// once are received one after the other, the second waiting (and saying so) until the first is installed, instead
/// of both being assembled at the same time. Both end installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_beyond_receive_max_bytes_wait_for_the_ones_before_them() {
    let broker = Mosquitto::start();
    let work = tempfile::tempdir().unwrap();
    let key = demo_signing_key();
    let a = ship(broker.port, &crate::models::renamed(work.path(), "model-a", "1.0.0", &key)).await;
    let b = ship(broker.port, &crate::models::renamed(work.path(), "model-b", "1.0.0", &key)).await;
    let room = a.announcement.size.max(b.announcement.size) * 3 / 2;
    let node = Node::with_models(
        "it-ship-mem",
        broker.port,
        &format!("receive = [\"*\"]\nreceive_activate = false\nreceive_timeout = \"30s\"\nreceive_max_bytes = {room}"),
    );
    let sub = Sub::start(broker.port, "it-ship-mem-sub", &[&format!("attrd/{}/model/state", node.name)], false).await;
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    sub.wait_for("both bundles installed", 120, |_| {
        transfer_states(&sub, &node.name).iter().filter(|v| v["transfer"]["status"] == "installed").count() == 2
    })
    .await;
    let steps = transfer_steps(&sub, &node.name);
    let at = |name: &str, status: &str| steps.iter().position(|(n, s)| n == name && s == status);
    // Whichever the broker delivered first is received first; the other waits.
    let (first, second) =
        if at("model-a", "waiting").is_some() { ("model-b", "model-a") } else { ("model-a", "model-b") };
    assert!(at(second, "waiting").is_some(), "no transfer waited: {steps:?}");
    assert!(at(first, "waiting").is_none(), "{steps:?}");
    let second_received = steps.iter().position(|(n, s)| n == second && s == "receiving").expect("received");
    assert!(second_received > at(first, "installed").unwrap(), "received while the first was held: {steps:?}");
    assert!(node.log().contains("waiting for the transfers before it"), "{}", node.log());
    assert!(child.try_wait().unwrap().is_none(), "attrd died:\n{}", node.log());
    child.kill().unwrap();
    let _ = child.wait();
}

/// An upload given up for missing chunks does not take the memory back from the one waiting for it: when the budget
/// is freed and the broker resends the retained announcements, the given-up upload is not fetched again (it would be
/// given up again after the same wait, and again, while the other one waited for ever); the waiting one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_given_up_does_not_starve_the_one_waiting_behind_it() {
    let broker = Mosquitto::start();
    let work = tempfile::tempdir().unwrap();
    let key = demo_signing_key();
    // Shipped first, so that the broker resends its announcement first.
    let broken = ship(broker.port, &crate::models::renamed(work.path(), "model-a", "1.0.0", &key)).await;
    let fine = ship(broker.port, &crate::models::renamed(work.path(), "model-b", "1.0.0", &key)).await;
    let gone = format!("attrd/models/model-a/chunks/{}/3", broken.announcement.transfer);
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1", "-r", "-n", "-t", &gone])
        .status()
        .unwrap();
    assert!(st.success());
    let room = broken.announcement.size.max(fine.announcement.size) * 3 / 2;
    let node = Node::with_models(
        "it-ship-starve",
        broker.port,
        &format!("receive = [\"*\"]\nreceive_activate = false\nreceive_timeout = \"1s\"\nreceive_max_bytes = {room}"),
    );
    let sub =
        Sub::start(broker.port, "it-ship-starve-sub", &[&format!("attrd/{}/model/state", node.name)], false).await;
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    sub.wait_for("model-b installed", 120, |_| {
        transfer_states(&sub, &node.name)
            .iter()
            .any(|v| v["transfer"]["name"] == "model-b" && v["transfer"]["status"] == "installed")
    })
    .await;
    // Long enough for a restarted model-a to show: it reports `receiving` at once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steps = transfer_steps(&sub, &node.name);
    let failed = steps.iter().position(|(n, s)| n == "model-a" && s == "failed");
    let failed = failed.unwrap_or_else(|| panic!("model-a, missing a chunk, was not given up: {steps:?}"));
    assert!(
        !steps[failed..].iter().any(|(n, s)| n == "model-a" && s == "receiving"),
        "the given-up upload was fetched again: {steps:?}"
    );
    assert!(child.try_wait().unwrap().is_none(), "attrd died:\n{}", node.log());
    child.kill().unwrap();
    let _ = child.wait();
}

fn background_states(sub: &Sub, node: &str) -> Vec<serde_json::Value> {
    transfer_states(sub, node).into_iter().filter(|v| !v["background"].is_null()).collect()
}

/// A provider listed in `engine.build_in_background` is built beside the serving one: here TensorRT, which this
/// machine's ONNX Runtime lacks, fails in the background with its reason published while the CPU keeps serving; and a
/// session that does build (the CPU itself, listed to exercise the path) is self-tested and swapped in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_providers_build_in_the_background_while_the_next_one_serves() {
    let broker = Mosquitto::start();
    let node = Node::with_tables("it-bg-trt", broker.port, "providers = [\"tensorrt\", \"cpu\"]", "");
    let sub = Sub::start(broker.port, "it-bg-sub", &["attrd/+/model/state", "attrd/+/results/#"], false).await;
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    sub.wait_for("the TensorRT build reported failed", 60, |_| {
        background_states(&sub, &node.name).iter().any(|v| v["background"]["status"] == "failed")
    })
    .await;
    let states = background_states(&sub, &node.name);
    // `building` may have been replaced before the broker saw it (retained state keeps the latest); the log has it.
    assert!(node.log().contains("building the preferred provider's session in the background"), "{states:#?}");
    let last = states.last().unwrap();
    assert_eq!(last["background"]["provider"], "tensorrt");
    assert!(last["background"]["error"].as_str().unwrap().to_lowercase().contains("tensorrt"), "{last}");
    assert_eq!(last["model"]["execution_provider"], "cpu");
    node.drop_photos(&skus("BG", 1));
    sub.wait_for("a result served by the CPU", 60, |m| {
        m.iter().any(|m| m.topic == format!("attrd/{}/results/BG000", node.name))
    })
    .await;
    child.kill().unwrap();
    let _ = child.wait();

    let node =
        Node::with_tables("it-bg-cpu", broker.port, "providers = [\"cpu\"]\nbuild_in_background = [\"cpu\"]", "");
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    sub.wait_for("the background session swapped in", 60, |_| {
        background_states(&sub, &node.name).iter().any(|v| v["background"]["status"] == "ready")
    })
    .await;
    let last = background_states(&sub, &node.name).pop().unwrap();
    assert_eq!(last["background"]["provider"], "cpu");
    assert!(last["self_test"]["golden_items"].as_u64().unwrap() > 0, "{last}");
    assert!(node.log().contains("background session ready; swapping"), "{}", node.log());
    child.kill().unwrap();
    let _ = child.wait();
}

fn hup(child: &Child) {
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
}

/// SIGHUP re-reads the configuration all or nothing: a broken file is refused and nothing changes; a valid change
/// (here the node name, so every topic moves) is applied by draining and starting again inside the same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_configuration_and_refuses_a_broken_one() {
    let broker = Mosquitto::start();
    let node = Node::new("it-hup-a", broker.port);
    let sub = Sub::start(broker.port, "it-hup-sub", &["attrd/+/results/#"], false).await;
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    let result_on = |n: &str, sku: &str| format!("attrd/{n}/results/{sku}");
    node.drop_photos(&["HUP1".to_string()]);
    sub.wait_for("HUP1 on node a", 60, |m| m.iter().any(|m| m.topic == result_on("it-hup-a", "HUP1"))).await;

    let good = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, format!("{good}\n[bogus]\nx = 1\n")).unwrap();
    hup(&child);
    for _ in 0..100 {
        if node.log().contains("reload refused") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.log().contains("reload refused"), "{}", node.log());
    assert!(node.log().contains("bogus"), "the refusal names the problem:\n{}", node.log());
    node.drop_photos(&["HUP2".to_string()]);
    sub.wait_for("HUP2 still on node a", 60, |m| m.iter().any(|m| m.topic == result_on("it-hup-a", "HUP2"))).await;

    std::fs::write(&node.config, good.replace("node = \"it-hup-a\"", "node = \"it-hup-b\"")).unwrap();
    hup(&child);
    for _ in 0..200 {
        if node.log().contains("configuration reloaded") && node.log().matches("attrd ready").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.log().contains("configuration reloaded"), "{}", node.log());
    node.drop_photos(&["HUP3".to_string()]);
    sub.wait_for("HUP3 on node b", 60, |m| m.iter().any(|m| m.topic == result_on("it-hup-b", "HUP3"))).await;
    assert!(child.try_wait().unwrap().is_none(), "the same process keeps running:\n{}", node.log());
    assert!(
        !sub.messages()
            .iter()
            .any(|m| m.topic == result_on("it-hup-b", "HUP1") || m.topic == result_on("it-hup-a", "HUP3")),
        "each photo is published once, under the node name in force"
    );

    // A stop that comes while a reload drains (systemctl stop or restart right after a reload) is not lost with the
    // signal handlers of the run that ended: attrd stops, gracefully, instead of serving on until systemd kills it.
    std::fs::write(&node.config, good.replace("node = \"it-hup-a\"", "node = \"it-hup-c\"")).unwrap();
    let drains = |log: &str| log.matches("shutting down").count();
    let before = drains(&node.log());
    hup(&child);
    for _ in 0..400 {
        if drains(&node.log()) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(drains(&node.log()) > before, "the reload's drain began:\n{}", node.log());
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "still running 30 s after SIGTERM:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}\n{}", node.log());
}

/// `systemctl reload` rotates the HTTP token: a SIGHUP whose settings are unchanged but whose token file holds a new
/// token starts again with it. Before, the old token stayed in force until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_takes_effect_on_sighup() {
    let broker = Mosquitto::start();
    let node = Node::new("it-token", broker.port);
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, format!("{text}token_file = \"token\"\n")).unwrap();
    std::fs::write(node.dir.path().join("token"), "old-token\n").unwrap();
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], node.http_port).into();
    let metrics = |token: &str| {
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
    };
    assert_eq!(crate::http::raw_http(addr, &metrics("old-token"), b"").await.0, 200);
    assert_eq!(crate::http::raw_http(addr, &metrics("new-token"), b"").await.0, 401);

    std::fs::write(node.dir.path().join("token"), "new-token\n").unwrap();
    hup(&child);
    let mut rotated = false;
    for _ in 0..400 {
        if node.log().matches("attrd ready").count() >= 2
            && crate::http::raw_http(addr, &metrics("new-token"), b"").await.0 == 200
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the new token was not taken:\n{}", node.log());
    assert!(node.log().contains("http token file changed"), "{}", node.log());
    assert_eq!(crate::http::raw_http(addr, &metrics("old-token"), b"").await.0, 401);
    child.kill().unwrap();
    let _ = child.wait();
}

/// The broker stopped and restarted mid-stream: the daemon keeps capturing and inferring while it is away (files
/// reach `done/` because their results are safe in the outbox), then replays; every photo arrives, none twice with
/// different ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_mid_stream_lose_nothing() {
    let mut broker = Mosquitto::start_persistent();
    let node = Node::new("it-brk", broker.port);
    let sub = Sub::start(broker.port, "it-brk-sub", &["attrd/it-brk/results/#"], true).await;
    let mut child = node.start();
    wait_ready(&node, &mut child).await;

    let mut all = BTreeSet::new();
    for (round, n) in [("A", 5), ("B", 8), ("C", 6)] {
        let batch = skus(&format!("BRK{round}"), n);
        all.extend(batch.iter().cloned());
        node.drop_photos(&batch);
        if round == "C" {
            break;
        }
        // Let some of the round through, then pull the broker away while the rest is in flight.
        tokio::time::sleep(Duration::from_millis(200)).await;
        broker.stop();
        let expect = all.len();
        for _ in 0..300 {
            if node.files_in("done").len() >= expect {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(node.files_in("done").len(), expect, "capture goes on without a broker:\n{}", node.log());
        broker.restart();
    }
    sub.wait_for("every photo's result after two broker restarts", 90, |_| {
        results_by_sku(&sub, &node.name).keys().cloned().collect::<BTreeSet<_>>() == all
    })
    .await;
    for (sku, ids) in results_by_sku(&sub, &node.name) {
        assert_eq!(ids.len(), 1, "{sku}: {ids:?}");
    }
    assert!(node.files_in("failed").is_empty());
    assert!(child.try_wait().unwrap().is_none(), "attrd died:\n{}", node.log());
    // The lost connections are counted where an operator looks (updated with the status, at most 10 s late).
    let mut mqtt_errors = 0.0;
    for _ in 0..300 {
        mqtt_errors = metric_value(node.http_port, "attrd_errors_total{kind=\"mqtt\"}");
        if mqtt_errors >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(mqtt_errors >= 2.0, "{mqtt_errors} MQTT errors counted over two broker outages");
    child.kill().unwrap();
    let _ = child.wait();
}

/// One series' value from the daemon's `/metrics` (0 when absent).
fn metric_value(port: u16, series: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return 0.0 };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// A capture command over MQTT fires a camera (a replay camera: recorded frames behind the same trait as V4L2) and
/// the SKU's result follows on MQTT; the reply names the cameras triggered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_capture_command_triggers_a_camera_and_publishes_its_result() {
    let broker = Mosquitto::start();
    let node = Node::new("it-cam", broker.port);
    let frames = node.dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    for (i, (_, path, _)) in fashion_rows().iter().skip(200).take(2).enumerate() {
        std::fs::copy(path, frames.join(format!("{i}.jpg"))).unwrap();
    }
    let mut cfg = std::fs::read_to_string(&node.config).unwrap();
    cfg.push_str(&format!("\n[[sources]]\ntype = \"v4l2\"\nname = \"front\"\nreplay = \"{}\"\n", frames.display()));
    std::fs::write(&node.config, cfg).unwrap();
    let sub =
        Sub::start(broker.port, "it-cam-sub", &["attrd/it-cam/results/#", "attrd/it-cam/cmd/capture/response"], false)
            .await;
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1", "-t", "attrd/it-cam/cmd/capture"])
        .args(["-m", r#"{"sku": "CAM-1", "cameras": ["front"]}"#])
        .status()
        .unwrap();
    assert!(st.success());
    let msgs = sub
        .wait_for("the reply and the result", 60, |m| {
            m.iter().any(|m| m.topic.ends_with("/response"))
                && m.iter().any(|m| m.topic == "attrd/it-cam/results/CAM-1")
        })
        .await;
    let reply = msgs.iter().find(|m| m.topic.ends_with("/response")).unwrap().json();
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["cameras"], serde_json::json!(["front"]));
    let result = msgs.iter().find(|m| m.topic == "attrd/it-cam/results/CAM-1").unwrap().json();
    assert_eq!(result["source"]["camera"], "front", "{result}");
    assert_eq!(result["source"]["type"], "fake", "{result}");
    child.kill().unwrap();
    let _ = child.wait();
}

/// A camera frame exists nowhere else. With the outbox full (broker away, `reject_new`), frames wait in the camera's
/// retry backoff, kept in the outbox database; a SIGHUP that applies a new configuration restarts the pipeline and
/// hands them on, and after a `kill -9` the next start sends them again. Once the broker is back, every frame's
/// result arrives, each with one `message_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_frames_whose_results_could_not_be_stored_yet_survive_a_reload_and_a_kill() {
    let mut broker = Mosquitto::start_persistent();
    let node = Node::new("it-held", broker.port);
    let frames = node.dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    for (i, (_, path, _)) in fashion_rows().iter().skip(200).take(2).enumerate() {
        std::fs::copy(path, frames.join(format!("{i}.jpg"))).unwrap();
    }
    let cfg = std::fs::read_to_string(&node.config).unwrap().replace(
        "path = \"outbox.sqlite3\"",
        "path = \"outbox.sqlite3\"\nmax_messages = 1\nwhen_full = \"reject_new\"",
    );
    let camera = format!(
        "\n[[sources]]\ntype = \"v4l2\"\nname = \"front\"\nreplay = \"{}\"\nretry_min = \"100ms\"\nretry_max = \"300ms\"\n",
        frames.display()
    );
    std::fs::write(&node.config, format!("{cfg}{camera}")).unwrap();
    let sub = Sub::start(broker.port, "it-held-sub", &["attrd/it-held/results/#"], true).await;
    let mut child = node.start();
    wait_ready(&node, &mut child).await;

    broker.stop();
    let skus = skus("HELD", 3);
    for sku in &skus {
        let body = format!(r#"{{"sku": "{sku}", "cameras": ["front"]}}"#);
        let (status, reply) = post_raw(node.http_port, "/v1/capture", body.as_bytes());
        assert!(status < 300, "{status} {reply}");
    }
    for _ in 0..200 {
        if node.log().matches("frame not stored yet").count() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.log().contains("frame not stored yet"), "the outbox is full:\n{}", node.log());

    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, text.replace("reconnect_max = \"500ms\"", "reconnect_max = \"600ms\"")).unwrap();
    hup(&child);
    for _ in 0..300 {
        if node.log().matches("attrd ready").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.log().contains("configuration reloaded"), "{}", node.log());
    assert!(node.log().contains("the frame is held for the next run"), "{}", node.log());
    assert!(node.log().contains("sending again the camera frames"), "{}", node.log());
    assert!(node.log().contains("frame kept in the outbox database"), "{}", node.log());

    child.kill().unwrap();
    let _ = child.wait();
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    assert!(node.log().contains("camera frames kept from before the restart are sent again"), "{}", node.log());

    broker.restart();
    let want: BTreeSet<String> = skus.iter().cloned().collect();
    sub.wait_for("every frame's result after the reload", 90, |_| {
        results_by_sku(&sub, &node.name).keys().cloned().collect::<BTreeSet<_>>() == want
    })
    .await;
    for (sku, ids) in results_by_sku(&sub, &node.name) {
        assert_eq!(ids.len(), 1, "{sku}: {ids:?}");
    }
    assert!(child.try_wait().unwrap().is_none(), "the same process keeps running:\n{}", node.log());
    assert!(!node.log().contains("they are lost") && !node.log().contains("dropped"), "{}", node.log());
    child.kill().unwrap();
    let _ = child.wait();
}

/// A fresh box bootstrapped from a bundle archive whose first activation failed (here: ONNX Runtime not found) must
/// not be stuck: the archive is installed by then, and the next start activates the installed copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_archive_whose_first_activation_failed_is_activated_on_the_next_start() {
    let broker = Mosquitto::start();
    let tmp = tempfile::tempdir().unwrap();
    let tar = tmp.path().join("boot.tar");
    let bundle = attrd::bundle::Bundle::open(repo().join("models/fashion-lite0-int8")).unwrap();
    attrd::bundle::pack_tar(&bundle, &tar).unwrap();
    let bad_ort = "ort_library = \"/nonexistent/libonnxruntime.so\"";
    let node = Node::build("it-boot", broker.port, bad_ort, "", &tar);
    let first = Command::new(env!("CARGO_BIN_EXE_attrd"))
        .args(["run", "--config"])
        .arg(&node.config)
        .env("ATTRD_LOG", "info,ort=warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(!first.status.success(), "{err}");
    assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");

    let text = std::fs::read_to_string(&node.config).unwrap().replace(bad_ort, "");
    std::fs::write(&node.config, text).unwrap();
    let mut child = node.start();
    wait_ready_within(&node, &mut child, 30).await;
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.dir.path().join("models/state.json")).unwrap()).unwrap();
    assert_eq!(state["active"], "fashion-attributes-1.0.0", "{state}");
}

/// The active model cannot serve any more (here its ONNX file was damaged; after an upgrade it may fail its golden
/// set): attrd starts with the previous model, raises `model_fallback`, and records the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_active_model_cannot_serve_falls_back_to_the_previous_one_and_raises_an_alarm() {
    let broker = Mosquitto::start();
    let node = Node::with_bundle("it-fallback", broker.port, &repo().join("models/fashion-lite0-int8"));
    let models = node.dir.path().join("models");
    let keys = attrd::bundle::TrustedKeys::from_files([repo().join("config/keys/attrd-demo.pub")]).unwrap();
    let store = attrd::models::ModelStore::open(&models, keys, false).unwrap();
    store.install(&repo().join("models/fashion-lite0-int8")).unwrap();
    let newer = store.install(&imagenet_bundle()).unwrap();
    let state = attrd::models::State {
        active: Some("imagenet-lite0-1.0.0".into()),
        previous: vec!["fashion-attributes-1.0.0".into()],
    };
    std::fs::write(models.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    let mut onnx = std::fs::OpenOptions::new().append(true).open(newer.dir().join("model.onnx")).unwrap();
    std::io::Write::write_all(&mut onnx, b"damage").unwrap();
    drop(onnx);

    let mut child = node.start();
    wait_ready_within(&node, &mut child, 60).await;
    let log = node.log();
    assert!(log.contains("ALARM imagenet-lite0-1.0.0 cannot serve"), "{log}");
    assert_eq!(metric_value(node.http_port, "attrd_alarm{alarm=\"model_fallback\"}"), 1.0);
    let state: attrd::models::State =
        serde_json::from_slice(&std::fs::read(models.join("state.json")).unwrap()).unwrap();
    assert_eq!(state.active.as_deref(), Some("fashion-attributes-1.0.0"));
    // The damaged bundle is last in the history, so a rollback does not go back to it first.
    assert_eq!(state.previous.last().map(String::as_str), Some("imagenet-lite0-1.0.0"));
    // And the fallback model serves.
    node.drop_photos(&["FALLBACK1".to_string()]);
    for _ in 0..600 {
        if node.files_in("done").contains("FALLBACK1_front.jpg") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.files_in("done").contains("FALLBACK1_front.jpg"), "{:?}\n{}", node.files_in("done"), node.log());
}

/// One raw HTTP/1.0 POST to the daemon: status and body.
fn post_raw(port: u16, path_and_query: &str, body: &[u8]) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let head = format!("POST {path_and_query} HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of headers");
    let status = String::from_utf8_lossy(&out[..split]).split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_slice(&out[split + 4..]).unwrap_or(serde_json::Value::Null))
}

/// HTTP uploads are a source like the hot folder: `POST /v1/photos` answers 202 once the result is stored in the
/// outbox, and the result reaches MQTT; a photo that can never produce one gets 422 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_uploads_are_published_over_mqtt_and_acknowledged_once_stored() {
    let broker = Mosquitto::start();
    let node = Node::with_bundle("it-upload", broker.port, &repo().join("models/fashion-lite0-int8"));
    let sub = Sub::start(broker.port, "it-upload-sub", &["attrd/it-upload/results/#"], false).await;
    let mut child = node.start();
    wait_ready_within(&node, &mut child, 30).await;
    let rows = fashion_rows();
    let photo = std::fs::read(&rows[7].1).unwrap();
    let port = node.http_port;
    let (status, body) =
        tokio::task::spawn_blocking(move || post_raw(port, "/v1/photos?sku=UP-1", &photo)).await.unwrap();
    assert_eq!(status, 202, "{body}\n{}", node.log());
    let sha = attrd::bundle::sha256_bytes(&std::fs::read(&rows[7].1).unwrap());
    assert_eq!(body, serde_json::json!({"sku": "UP-1", "image_sha256": sha}));
    let msgs = sub.wait_for("the uploaded photo's result", 60, |m| !m.is_empty()).await;
    let result = msgs[0].json();
    assert_eq!(msgs[0].topic, "attrd/it-upload/results/UP-1");
    assert_eq!(
        (result["source"]["type"].as_str(), result["source"]["image_sha256"].as_str()),
        (Some("http"), Some(sha.as_str()))
    );
    assert!(result["attributes"]["articleType"]["value"].is_string(), "{result}");

    // Refused with specific errors, and nothing published for them.
    let (status, body) =
        tokio::task::spawn_blocking(move || post_raw(port, "/v1/photos?sku=UP-2", b"<html>502</html>")).await.unwrap();
    assert_eq!((status, body["kind"].as_str()), (422, Some("failed")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("unrecognised image format"), "{body}");
    let (status, body) = tokio::task::spawn_blocking(move || post_raw(port, "/v1/photos", b"x")).await.unwrap();
    assert_eq!((status, body["kind"].as_str()), (400, Some("bad_request")), "{body}");
    let (status, body) =
        tokio::task::spawn_blocking(move || post_raw(port, "/v1/photos?sku=A%2FB", b"x")).await.unwrap();
    assert_eq!(status, 400, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sub.messages().len(), 1, "{:?}", sub.messages().iter().map(|m| m.topic.clone()).collect::<Vec<_>>());
    // The daemon still stops promptly: the HTTP server does not hold the pipeline open.
    let stopped = std::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}\n{}", node.log());
    assert!(stopped.elapsed() < Duration::from_secs(8), "stop took {:?}\n{}", stopped.elapsed(), node.log());
    assert!(!node.log().contains("shutdown deadline passed"), "{}", node.log());
}

/// A reload whose drain overruns `shutdown_timeout` does not start a second instance beside the detached leftovers of
/// the first: attrd exits with an error, for systemd to start it afresh with the new configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_drain_overruns_exits_for_a_clean_restart() {
    let broker = Mosquitto::start();
    let node = Node::new("it-hup-slow", broker.port);
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, format!("shutdown_timeout = \"1ms\"\n{text}")).unwrap();
    let mut child = node.start();
    wait_ready(&node, &mut child).await;
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, text.replace("node = \"it-hup-slow\"", "node = \"it-hup-slow2\"")).unwrap();
    hup(&child);
    let mut status = None;
    for _ in 0..200 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.unwrap_or_else(|| panic!("still running after the overrun:\n{}", node.log()));
    assert!(!status.success(), "{status}");
    assert!(node.log().contains("exiting so that systemd starts attrd afresh"), "{}", node.log());
    assert_eq!(node.log().matches("attrd ready").count(), 1, "{}", node.log());
}
