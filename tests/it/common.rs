//! Paths and helpers shared by the integration tests.

use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `models/imagenet-lite0`, built by `./scripts/setup` from the real pretrained weights.
pub fn imagenet_bundle() -> PathBuf {
    let p = repo().join("models/imagenet-lite0");
    assert!(p.join("manifest.json").is_file(), "{} missing: run ./scripts/setup first", p.display());
    p
}

/// The real labelled product photos (`../shared/data/fashion`, or `ATTRD_DATA_DIR`).
pub fn fashion() -> PathBuf {
    let p =
        std::env::var_os("ATTRD_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("../shared/data/fashion"));
    assert!(p.join("labels.csv").is_file(), "{} has no labels.csv (set ATTRD_DATA_DIR)", p.display());
    p
}

/// Rows of `labels.csv` as (id, file, articleType), in file order.
pub fn fashion_rows() -> Vec<(String, PathBuf, String)> {
    let dir = fashion();
    let text = std::fs::read_to_string(dir.join("labels.csv")).expect("labels.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    let (id, file, art) = (col("id"), col("file"), col("articleType"));
    lines
        .filter_map(|l| {
            // productDisplayName may contain quoted commas, but the columns we read come before it.
            let f: Vec<&str> = l.split(',').collect();
            (f.len() > art).then(|| (f[id].to_string(), dir.join(f[file]), f[art].to_string()))
        })
        .collect()
}

/// Copies a bundle directory so a test can tamper with it.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// A mosquitto broker on 127.0.0.1 for one test, on a free port; killed on drop.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
    /// Lines for the listener (TLS files, …), written right after `listener`.
    listener_conf: String,
    child: Option<std::process::Child>,
}

impl Mosquitto {
    /// An in-memory broker (`persistence false`).
    pub fn start() -> Self {
        Self::start_on(free_port(), false)
    }

    /// A broker that saves sessions, subscriptions and queued QoS 1 messages when stopped with [`Mosquitto::stop`]
    /// and restores them on [`Mosquitto::restart`], so a persistent subscriber misses nothing while it is down.
    pub fn start_persistent() -> Self {
        Self::start_on(free_port(), true)
    }

    /// A broker on a given port (for example one a client has been retrying against).
    pub fn start_on(port: u16, persistent: bool) -> Self {
        Self::start_with_listener(port, persistent, "")
    }

    /// A broker whose listener gets extra settings (for example `cafile`, `certfile`, `keyfile` for TLS).
    pub fn start_with_listener(port: u16, persistent: bool, listener_conf: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Self { port, dir, persistent, listener_conf: listener_conf.to_owned(), child: None };
        m.restart();
        m
    }

    /// Stops the broker gracefully (SIGTERM: clients see the connection close, persistence is written).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            assert!(status.is_ok_and(|s| s.success()), "kill -TERM mosquitto failed");
            child.wait().unwrap();
        }
    }

    /// Starts the broker again on the same port (stopping it first if it runs).
    pub fn restart(&mut self) {
        self.stop();
        let d = self.dir.path();
        let conf = d.join("mosquitto.conf");
        // `user root`: started as root (CI containers), mosquitto would otherwise switch to the `mosquitto` user and
        // could not write its persistence file or log into this private directory. Ignored when not root.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{listener}\nallow_anonymous true\npersistence {persist}\nuser root\n\
                 persistence_location {dir}/\nlog_dest file {dir}/mosquitto.log\nlog_type all\n",
                port = self.port,
                listener = self.listener_conf,
                persist = self.persistent,
                dir = d.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start /usr/sbin/mosquitto");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().unwrap());
            assert!(exited.is_none(), "mosquitto exited ({exited:?}):\n{}", self.log());
            assert!(std::time::Instant::now() < deadline, "mosquitto did not listen on {}:\n{}", self.port, self.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The broker's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
