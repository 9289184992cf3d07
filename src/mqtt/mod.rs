//! MQTT: the topic tree ([`topics`]), the broker connection settings ([`MqttConfig`]) and the [`Publisher`] task
//! that drains the [`crate::outbox::Outbox`] to the broker and receives commands. Protocol details are in
//! `docs/mqtt.md`.

mod publisher;
pub mod topics;
pub mod transfer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

pub use publisher::{
    Connection, IncomingCommand, ModelMessage, ModelMessages, Publisher, PublisherHandle, PublisherState,
};
pub use topics::{CommandKind, CommandTopic, ModelTopic, TopicError, Topics};

/// How to reach the broker and how to behave on it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host name or IP address.
    pub host: String,
    /// Broker port (1883 is plain MQTT, 8883 the usual TLS port).
    pub port: u16,
    /// This box's name in topics (`<topic_prefix>/<node>/…`); defaults to the host name.
    pub node: Option<String>,
    /// MQTT client id; defaults to `attrd-<node>`. Must be unique on the broker: a second client with the same id
    /// disconnects the first.
    pub client_id: Option<String>,
    /// First segment(s) of every topic.
    pub topic_prefix: String,
    /// Keep-alive interval (whole seconds, at least 1 s: the pings are how a dead broker is noticed). A dead connection is
    /// noticed after about 1.5 times this.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// User name for broker authentication.
    pub username: Option<String>,
    /// Password for broker authentication (needs `username`); prefer `password_file`.
    pub password: Option<String>,
    /// File holding the password (trailing newline ignored); read at start. Exclusive with `password`.
    pub password_file: Option<PathBuf>,
    /// TLS to the broker; plain TCP when absent.
    pub tls: Option<MqttTlsConfig>,
    /// First wait before reconnecting after a failed or lost connection.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest wait between reconnect attempts; the wait doubles from `reconnect_min` up to this.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Most outbox messages published and not yet acknowledged by the broker (1 to 10 000).
    pub max_in_flight: u16,
    /// How long a graceful shutdown waits for the broker to acknowledge `stopped` and in-flight results.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Received commands waiting for the daemon; further commands get a `busy` error reply.
    pub command_queue: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 1883,
            node: None,
            client_id: None,
            topic_prefix: "attrd".into(),
            keep_alive: Duration::from_secs(30),
            username: None,
            password: None,
            password_file: None,
            tls: None,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            max_in_flight: 64,
            shutdown_timeout: Duration::from_secs(5),
            command_queue: 32,
        }
    }
}

impl std::fmt::Debug for MqttConfig {
    // Hand-written so the password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("node", &self.node)
            .field("client_id", &self.client_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("max_in_flight", &self.max_in_flight)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("command_queue", &self.command_queue)
            .finish()
    }
}

/// TLS settings (rustls with the `ring` provider).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsConfig {
    /// PEM file with the CA certificate(s) that sign the broker's certificate. The broker is verified against
    /// these only (not the system store), and its certificate must name `host`.
    pub ca_file: PathBuf,
    /// PEM client certificate chain for mutual TLS; needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the client certificate.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// Errors of the MQTT side.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The configuration cannot work.
    #[error("invalid MQTT configuration: {0}")]
    Config(String),
    /// The node name or topic prefix cannot be used in topics.
    #[error("invalid MQTT topic settings")]
    Topic(#[from] TopicError),
    /// A topic handed to the publisher is not publishable.
    #[error("cannot publish to {0:?}: topics must be non-empty and contain no '+', '#' or NUL")]
    InvalidTopic(String),
    /// The password file could not be read.
    #[error("cannot read MQTT password file {}", path.display())]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file could not be read or parsed.
    #[error("cannot read TLS file {}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The CA file contains no usable certificate.
    #[error("TLS CA file {} contains no usable certificate", path.display())]
    NoCaCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls rejected the settings (for example a key that does not match the certificate).
    #[error("invalid TLS settings")]
    Tls(#[source] rustls::Error),
    /// The publisher's request queue is full; try again later.
    #[error("MQTT publisher is busy")]
    Busy,
    /// The publisher task has ended.
    #[error("MQTT publisher has stopped")]
    Stopped,
}

impl MqttConfig {
    /// The node name: `node`, or else the host name (or `attrd` if that cannot be read).
    pub fn node_name(&self) -> String {
        if let Some(n) = &self.node {
            return n.clone();
        }
        ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "attrd".into())
    }

    /// The topics of this node.
    pub fn topics(&self) -> Result<Topics, MqttError> {
        Ok(Topics::new(&self.topic_prefix, &self.node_name())?)
    }

    /// The client id: `client_id`, or `attrd-<node>`.
    pub fn client_id(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| format!("attrd-{}", self.node_name()))
    }

    /// Checks everything that does not need files.
    pub fn validate(&self) -> Result<(), MqttError> {
        let bad = |m: &str| Err(MqttError::Config(m.to_owned()));
        if self.host.is_empty() {
            return bad("host must not be empty");
        }
        if self.port == 0 {
            return bad("port must not be 0");
        }
        self.topics()?;
        if self.client_id.as_deref().is_some_and(str::is_empty) {
            return bad("client_id must not be empty (leave it out for attrd-<node>)");
        }
        // No "0 to disable": without pings a broker that vanished after taking the last publishes is never noticed
        // (the read just waits), and every result after them would wait for a restart.
        if self.keep_alive < Duration::from_secs(1) || self.keep_alive.subsec_nanos() != 0 {
            return bad("keep_alive must be whole seconds, at least 1 s (pings are how a dead broker is noticed)");
        }
        if self.keep_alive > Duration::from_secs(u64::from(u16::MAX)) {
            return bad("keep_alive must be at most 65535 s");
        }
        if self.password.is_some() && self.password_file.is_some() {
            return bad("password and password_file are exclusive");
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            return bad("a password needs a username (MQTT 3.1.1)");
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return bad("reconnect_min must be greater than 0 and not greater than reconnect_max");
        }
        if self.max_in_flight == 0 || self.max_in_flight > 10_000 {
            return bad("max_in_flight must be between 1 and 10000");
        }
        if self.command_queue == 0 {
            return bad("command_queue must be at least 1");
        }
        if let Some(tls) = &self.tls
            && tls.client_cert_file.is_some() != tls.client_key_file.is_some()
        {
            return bad("tls.client_cert_file and tls.client_key_file go together");
        }
        Ok(())
    }

    /// rumqttc options for a connection as `client_id` with this configuration's broker, keep-alive, credentials
    /// and TLS; the caller adds session, will and window settings.
    pub fn client_options(&self, client_id: &str) -> Result<rumqttc::MqttOptions, MqttError> {
        self.validate()?;
        let mut opts = rumqttc::MqttOptions::new(client_id, self.host.clone(), self.port);
        opts.set_keep_alive(self.keep_alive);
        if let Some(user) = &self.username {
            opts.set_credentials(user.clone(), self.read_password()?.unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            let config = tls_client_config(tls)?;
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(
                config,
            ))));
        }
        Ok(opts)
    }

    /// The password from `password` or `password_file`.
    fn read_password(&self) -> Result<Option<String>, MqttError> {
        match (&self.password, &self.password_file) {
            (Some(p), _) => Ok(Some(p.clone())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| MqttError::PasswordFile { path: path.clone(), source })?;
                Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Makes `ring` the process-wide rustls crypto provider, once. Code that builds rustls configs without naming a
/// provider (rumqttc's defaults, other clients) then uses it too.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another part of the process already installed a provider, which is then the one in use.
        if rustls::crypto::ring::default_provider().install_default().is_err() {
            tracing::debug!("a rustls crypto provider was already installed");
        }
    });
}

/// Builds the rustls client configuration for `tls`.
pub fn tls_client_config(tls: &MqttTlsConfig) -> Result<rustls::ClientConfig, MqttError> {
    install_crypto_provider();
    let pem_err = |path: &Path| {
        let path = path.to_owned();
        move |source| MqttError::TlsFile { path, source }
    };
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&tls.ca_file)
        .map_err(pem_err(&tls.ca_file))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(&tls.ca_file))?;
    let (added, ignored) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(MqttError::NoCaCertificate { path: tls.ca_file.clone() });
    }
    if ignored > 0 {
        tracing::warn!(file = %tls.ca_file.display(), ignored, "unusable certificates in the TLS CA file ignored");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(MqttError::Tls)?
        .with_root_certificates(roots);
    match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(pem_err(cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_err(cert))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
            builder.with_client_auth_cert(chain, key).map_err(MqttError::Tls)
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(MqttError::Config("tls.client_cert_file and tls.client_key_file go together".into())),
    }
}
