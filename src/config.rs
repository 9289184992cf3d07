//! The daemon's configuration: defaults → `/etc/attrd/attrd.toml` → `/etc/attrd/conf.d/*.toml` (in name order) →
//! environment (`ATTRD__MQTT__HOST=broker` sets `mqtt.host`). Every section rejects unknown keys, so a typo is an
//! error at start-up instead of a silently ignored setting. Loading and validation never touch the network.

use crate::engine::EngineConfig;
use crate::http::HttpConfig;
use crate::mqtt::MqttConfig;
use crate::outbox::OutboxConfig;
use crate::pipeline::PipelineConfig;
use crate::sources::SourceConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where `attrd run` looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/attrd/attrd.toml";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read configuration {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Parse(#[from] config::ConfigError),
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// ONNX Runtime: execution providers in order, threads, library path.
    pub engine: EngineConfig,
    /// The model store and whom it trusts.
    pub models: ModelsConfig,
    /// Batching, queues and multi-view fusion.
    pub pipeline: PipelineConfig,
    /// Capture sources (`[[sources]]` tables with `type = "hotfolder"` or `"v4l2"`).
    pub sources: Vec<SourceConfig>,
    /// The durable on-disk queue between inference and MQTT.
    pub outbox: OutboxConfig,
    /// The MQTT broker and topic tree.
    pub mqtt: MqttConfig,
    /// HTTP API, health and metrics endpoints.
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
    /// Conveniences for demos and tests (a private broker, sample photos); leave unset in production.
    pub demo: DemoConfig,
    /// How long a graceful shutdown may take before in-flight work is abandoned (it stays in the outbox or source).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: std::time::Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            models: ModelsConfig::default(),
            pipeline: PipelineConfig::default(),
            sources: Vec::new(),
            outbox: OutboxConfig::default(),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            demo: DemoConfig::default(),
            shutdown_timeout: std::time::Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Directory of installed bundles and `state.json`.
    pub dir: PathBuf,
    /// PEM public keys trusted to sign bundles. At least one is required: the daemon never runs unsigned models.
    pub trusted_keys: Vec<PathBuf>,
    /// A bundle (directory or `.tar`) installed and activated at start-up when no model is active yet, so a fresh box
    /// comes up serving. It must be signed by a trusted key like any other bundle.
    pub bootstrap: Option<PathBuf>,
    /// Model names whose bundles are received over MQTT (`<prefix>/models/<name>`, see `docs/mqtt.md`); `"*"`
    /// accepts every name. Empty: nothing is received. Received bundles are verified like any other.
    pub receive: Vec<String>,
    /// Activate a received bundle once installed (after its golden set passes on this box's provider). When false
    /// it is only installed, for `attrd model activate`.
    pub receive_activate: bool,
    /// Largest bundle archive accepted over MQTT, in bytes, and the most that transfers hold in memory together
    /// (archives being assembled, and received ones waiting for their install): an announcement that does not fit
    /// beside the transfers before it waits for them (`waiting` in `model/state`) and is fetched again after.
    pub receive_max_bytes: u64,
    /// How long the chunks of an announced bundle may take to arrive before the transfer is retried.
    #[serde(with = "humantime_serde")]
    pub receive_timeout: std::time::Duration,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/attrd/models"),
            trusted_keys: Vec::new(),
            bootstrap: None,
            receive: Vec::new(),
            receive_activate: true,
            receive_max_bytes: 256 * 1024 * 1024,
            receive_timeout: std::time::Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (journald adds its own timestamps).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `attrd=debug,ort=warn`; `ATTRD_LOG` overrides it.
    pub filter: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: "info,ort=warn".into(), format: LogFormat::Text }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Start a private mosquitto on `mqtt.host:mqtt.port` (which must be a loopback address) and stop it on exit.
    pub spawn_broker: bool,
    /// The mosquitto executable.
    pub mosquitto: PathBuf,
    /// Copy the photos in this directory into the first hot folder at start-up.
    pub seed_hotfolder: Option<PathBuf>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self { spawn_broker: false, mosquitto: PathBuf::from("mosquitto"), seed_hotfolder: None }
    }
}

impl Config {
    /// Loads `path` (which must exist), the `conf.d/*.toml` directory beside it, then `ATTRD__…` environment variables.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "configuration file not found"),
            });
        }
        let mut b = config::Config::builder().add_source(config::File::from(path).format(config::FileFormat::Toml));
        let conf_d = path.with_file_name("conf.d");
        if conf_d.is_dir() {
            let mut parts: Vec<PathBuf> = std::fs::read_dir(&conf_d)
                .map_err(|source| ConfigError::Io { path: conf_d.clone(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            parts.sort();
            for p in parts {
                b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
            }
        }
        // A double underscore after the prefix too, so `ATTRD_LOG` (a CLI flag's variable) is not read as a key.
        b = b.add_source(
            config::Environment::with_prefix("ATTRD").prefix_separator("__").separator("__").try_parsing(true),
        );
        let mut cfg: Config = b.build()?.try_deserialize()?;
        cfg.resolve_relative(path.parent().unwrap_or(Path::new(".")));
        cfg.validate()?;
        Ok(cfg)
    }

    /// Relative paths in a config file are relative to that file, so a config and its keys can travel together.
    fn resolve_relative(&mut self, base: &Path) {
        // Absolute and free of `..`: file watchers report canonical paths, and logs should name real places.
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        fix(&mut self.models.dir);
        if let Some(p) = self.engine.ort_library.as_mut() {
            fix(p);
        }
        self.models.trusted_keys.iter_mut().for_each(fix);
        if let Some(p) = self.models.bootstrap.as_mut() {
            fix(p);
        }
        fix(&mut self.outbox.path);
        if let Some(p) = self.engine.tensorrt_cache_dir.as_mut() {
            fix(p);
        }
        if let Some(p) = self.http.token_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.mqtt.password_file.as_mut() {
            fix(p);
        }
        if let Some(tls) = self.mqtt.tls.as_mut() {
            fix(&mut tls.ca_file);
            tls.client_cert_file.iter_mut().for_each(fix);
            tls.client_key_file.iter_mut().for_each(fix);
        }
        if let Some(p) = self.demo.seed_hotfolder.as_mut() {
            fix(p);
        }
        for s in &mut self.sources {
            match s {
                SourceConfig::Hotfolder(h) => {
                    fix(&mut h.dir);
                    h.done_dir.iter_mut().for_each(fix);
                    h.failed_dir.iter_mut().for_each(fix);
                }
                SourceConfig::V4l2(c) => c.replay.iter_mut().for_each(fix),
            }
        }
    }

    /// Checks what can be checked without the network or the GPU.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.models.trusted_keys.is_empty() {
            return bad("models.trusted_keys is empty: list the public key(s) that sign your bundles".into());
        }
        for k in &self.models.trusted_keys {
            crate::bundle::read_public_key(k).map_err(|e| ConfigError::Invalid(format!("models.trusted_keys: {e}")))?;
        }
        if let Some(b) = &self.models.bootstrap
            && !b.exists()
        {
            return bad(format!("models.bootstrap {} does not exist", b.display()));
        }
        for name in self.models.receive.iter().filter(|n| n.as_str() != "*") {
            crate::mqtt::Topics::new("attrd", "n")
                .and_then(|t| t.models(name))
                .map_err(|e| ConfigError::Invalid(format!("models.receive: {e}")))?;
        }
        if self.models.receive.iter().any(|n| n == "*") && self.models.receive.len() > 1 {
            return bad("models.receive: \"*\" already means every name; list no others".into());
        }
        if self.models.receive_timeout.is_zero() {
            return bad("models.receive_timeout must be greater than 0".into());
        }
        self.pipeline.validate().map_err(|e| ConfigError::Invalid(format!("pipeline: {e}")))?;
        // Reads the token file: a missing one is a configuration error now, not a failed start after a reload.
        self.http.resolve_token().map_err(|e| ConfigError::Invalid(crate::util::error_chain(&e)))?;
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| ConfigError::Invalid(format!("log.filter {:?}: {e}", self.log.filter)))?;
        self.mqtt.validate().map_err(|e| ConfigError::Invalid(format!("mqtt: {}", crate::util::error_chain(&e))))?;
        // Reads the password and TLS files, as connecting would: missing ones are errors now, not after a reload
        // has already torn the running daemon down.
        crate::mqtt::install_crypto_provider();
        self.mqtt
            .client_options(&self.mqtt.client_id())
            .map_err(|e| ConfigError::Invalid(format!("mqtt: {}", crate::util::error_chain(&e))))?;
        crate::sources::validate(&self.sources)
            .map_err(|e| ConfigError::Invalid(format!("sources: {}", crate::util::error_chain(&e))))?;
        self.outbox.validate().map_err(|e| ConfigError::Invalid(format!("outbox: {e}")))?;
        if self.outbox.max_bytes < MIN_OUTBOX_BYTES {
            // A result is a few KB of JSON: below this, results would be refused as too large, photo after photo.
            return bad(format!("outbox.max_bytes must be at least {MIN_OUTBOX_BYTES} (64 KiB)"));
        }
        if self.demo.seed_hotfolder.is_some()
            && !self.sources.iter().any(|s| matches!(s, crate::sources::SourceConfig::Hotfolder(_)))
        {
            return bad("demo.seed_hotfolder is set but no hot folder is configured".into());
        }
        if self.shutdown_timeout.is_zero() {
            return bad("shutdown_timeout must be greater than 0 (every stop would skip the drain)".into());
        }
        if self.demo.spawn_broker && !matches!(self.mqtt.host.as_str(), "localhost" | "127.0.0.1" | "::1") {
            return bad(format!("demo.spawn_broker needs mqtt.host on loopback, not {:?}", self.mqtt.host));
        }
        if !(1..=64).contains(&self.engine.sessions) {
            return bad(format!("engine.sessions is {}, must be 1 to 64", self.engine.sessions));
        }
        if self.engine.providers.is_empty() {
            return bad("engine.providers is empty".into());
        }
        Ok(())
    }
}

const MIN_OUTBOX_BYTES: u64 = 64 * 1024;

/// Removes `.` and `..` components without touching the file system (the path may not exist yet).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
