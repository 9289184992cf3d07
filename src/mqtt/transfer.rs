//! Bundles over MQTT: the wire format that `trainer ship` (through [`ship`]) publishes and the daemon's receiver
//! reassembles with [`Assembly`].
//!
//! A bundle travels as its deterministic `.tar` ([`crate::bundle::pack_tar`]), cut into chunks, because brokers and
//! clients limit packet sizes (attrd accepts at most 1 MiB). Every message is retained, so a box that is offline
//! while a model ships gets it when it comes back:
//!
//! - `<prefix>/models/<name>/chunks/<transfer>/<i>`: raw chunk bytes, `transfer` = the first 16 hex digits of the
//!   archive's SHA-256, so chunks of two uploads never mix;
//! - `<prefix>/models/<name>`: the [`Announcement`] (JSON), published only after every chunk was acknowledged, so a
//!   receiver never sees an announcement whose chunks are missing.
//!
//! Integrity comes from the SHA-256 of each chunk and of the whole archive; authenticity only from the bundle's
//! signature, which the model store checks on install exactly as for a bundle from a USB stick.

use std::collections::BTreeSet;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, Outgoing, QoS};
use serde::{Deserialize, Serialize};

use super::topics::{TRANSFER_ID_LEN, TopicError};
use super::{MqttConfig, MqttError};
use crate::bundle::{self, Bundle, BundleError, sha256_bytes};

/// Version of the announcement format; receivers refuse others.
pub const TRANSFER_FORMAT: u32 = 1;
/// Default chunk size: small enough for any broker default and for attrd's 1 MiB incoming limit.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Largest chunk size accepted, leaving room under the 1 MiB packet limit for the topic and headers.
pub const MAX_CHUNK_SIZE: u32 = 960 * 1024;

/// How long [`ship`] waits after subscribing for the retained announcement it replaces.
const RETAINED_WAIT: Duration = Duration::from_secs(1);

/// Why a transfer cannot proceed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The announcement is not valid JSON of the expected shape.
    #[error("malformed model announcement: {0}")]
    Malformed(String),
    /// The announcement is well-formed but inconsistent or unacceptable.
    #[error("model announcement rejected: {0}")]
    Invalid(String),
    /// The announced archive is larger than this node accepts.
    #[error("announced bundle is {size} bytes, more than the {max} this node accepts (models.receive_max_bytes)")]
    TooLarge {
        /// Announced size.
        size: u64,
        /// The configured limit.
        max: u64,
    },
    /// A chunk does not match its announced index, size or hash.
    #[error("chunk {index} rejected: {reason}")]
    BadChunk {
        /// The chunk index.
        index: u32,
        /// Why.
        reason: String,
    },
    /// All chunks arrived but the whole archive's hash differs from the announced one.
    #[error("reassembled archive has SHA-256 {actual}, the announcement says {expected}")]
    Checksum {
        /// Announced.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// A name or id cannot be used in a topic.
    #[error("invalid topic value")]
    Topic(#[from] TopicError),
    /// The bundle could not be read or packed.
    #[error("cannot pack the bundle")]
    Bundle(#[from] BundleError),
    /// The broker connection failed.
    #[error("MQTT")]
    Mqtt(#[from] MqttError),
    /// rumqttc reported an error while shipping.
    #[error("MQTT connection: {0}")]
    Connection(String),
    /// The broker did not acknowledge in time.
    #[error("timed out after {0:?} waiting for the broker")]
    Timeout(Duration),
}

/// The retained message on `<prefix>/models/<name>` describing the current upload of that model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    /// [`TRANSFER_FORMAT`].
    pub format: u32,
    /// Model name (the bundle manifest's `name`, also the topic segment).
    pub name: String,
    /// Bundle version (the manifest's `version`).
    pub version: String,
    /// Upload id used in chunk topics: the first 16 hex digits of `sha256`.
    pub transfer: String,
    /// SHA-256 of the whole archive, lowercase hex.
    pub sha256: String,
    /// Archive size in bytes.
    pub size: u64,
    /// Size of every chunk but the last.
    pub chunk_size: u32,
    /// SHA-256 of each chunk, in order; its length is the number of chunks.
    pub chunks: Vec<String>,
    /// When the upload was published (RFC 3339).
    pub published_at: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Announcement {
    /// Describes `archive` for shipping under `name`/`version` in chunks of `chunk_size` bytes.
    pub fn describe(name: &str, version: &str, archive: &[u8], chunk_size: u32) -> Result<Self, TransferError> {
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(TransferError::Invalid(format!("chunk size must be 1..={MAX_CHUNK_SIZE} bytes")));
        }
        let sha256 = sha256_bytes(archive);
        Ok(Self {
            format: TRANSFER_FORMAT,
            name: name.to_owned(),
            version: version.to_owned(),
            transfer: sha256[..TRANSFER_ID_LEN].to_owned(),
            chunks: archive.chunks(chunk_size as usize).map(sha256_bytes).collect(),
            sha256,
            size: archive.len() as u64,
            chunk_size,
            published_at: crate::util::now_rfc3339(),
        })
    }

    /// Parses and checks an announcement received on the topic of model `topic_name`; `max_size` is the largest
    /// archive this node accepts.
    pub fn parse(payload: &[u8], topic_name: &str, max_size: u64) -> Result<Self, TransferError> {
        let a: Self = serde_json::from_slice(payload).map_err(|e| TransferError::Malformed(e.to_string()))?;
        let bad = |m: String| Err(TransferError::Invalid(m));
        if a.format != TRANSFER_FORMAT {
            return bad(format!("format {} is not supported (this attrd reads format {TRANSFER_FORMAT})", a.format));
        }
        if a.name != topic_name {
            return bad(format!("it names model {:?} but arrived on the topic of {topic_name:?}", a.name));
        }
        if !is_hex(&a.sha256, 64) || a.transfer != a.sha256[..TRANSFER_ID_LEN] {
            return bad("sha256 must be 64 lowercase hex digits and transfer its first 16".into());
        }
        if a.size > max_size {
            return Err(TransferError::TooLarge { size: a.size, max: max_size });
        }
        if a.size == 0 || a.chunk_size == 0 || a.chunk_size > MAX_CHUNK_SIZE {
            return bad(format!("size must be > 0 and chunk_size 1..={MAX_CHUNK_SIZE}"));
        }
        let expected = a.size.div_ceil(u64::from(a.chunk_size));
        if a.chunks.len() as u64 != expected {
            return bad(format!(
                "{} bytes in chunks of {} need {expected} chunk hashes, not {}",
                a.size,
                a.chunk_size,
                a.chunks.len()
            ));
        }
        if let Some(h) = a.chunks.iter().find(|h| !is_hex(h, 64)) {
            return bad(format!("chunk hash {h:?} is not 64 lowercase hex digits"));
        }
        Ok(a)
    }

    /// The number of chunks.
    pub fn chunk_count(&self) -> u32 {
        // `parse`/`describe` bound the count by size / chunk_size, far below u32::MAX for any accepted size.
        u32::try_from(self.chunks.len()).unwrap_or(u32::MAX)
    }

    /// Expected length of chunk `index`.
    fn chunk_len(&self, index: u32) -> u64 {
        let start = u64::from(index) * u64::from(self.chunk_size);
        (self.size - start).min(u64::from(self.chunk_size))
    }
}

/// Collects the chunks of one announced upload, in any order, checking each as it arrives.
#[derive(Debug)]
pub struct Assembly {
    ann: Announcement,
    buf: Vec<u8>,
    missing: BTreeSet<u32>,
}

impl Assembly {
    /// Starts collecting the upload `ann` describes (its size was bounded by [`Announcement::parse`]).
    pub fn new(ann: Announcement) -> Self {
        let missing = (0..ann.chunk_count()).collect();
        Self { buf: vec![0; ann.size as usize], missing, ann }
    }

    /// The announcement being assembled.
    pub fn announcement(&self) -> &Announcement {
        &self.ann
    }

    /// Adds chunk `index`; returns `true` once every chunk is in. Repeats of a chunk already held are ignored.
    pub fn add(&mut self, index: u32, bytes: &[u8]) -> Result<bool, TransferError> {
        let bad = |reason: String| Err(TransferError::BadChunk { index, reason });
        if index >= self.ann.chunk_count() {
            return bad(format!("only {} chunks were announced", self.ann.chunk_count()));
        }
        if !self.missing.contains(&index) {
            return Ok(self.missing.is_empty());
        }
        let len = self.ann.chunk_len(index);
        if bytes.len() as u64 != len {
            return bad(format!("{} bytes, expected {len}", bytes.len()));
        }
        let sha = sha256_bytes(bytes);
        if sha != self.ann.chunks[index as usize] {
            return bad(format!("SHA-256 {sha} differs from the announced one"));
        }
        let start = index as usize * self.ann.chunk_size as usize;
        self.buf[start..start + bytes.len()].copy_from_slice(bytes);
        self.missing.remove(&index);
        Ok(self.missing.is_empty())
    }

    /// Chunks received and announced.
    pub fn progress(&self) -> (u32, u32) {
        let total = self.ann.chunk_count();
        (total - self.missing.len() as u32, total)
    }

    /// The archive, once complete and matching the announced SHA-256.
    pub fn finish(self) -> Result<Vec<u8>, TransferError> {
        if let Some(i) = self.missing.first() {
            return Err(TransferError::BadChunk { index: *i, reason: "missing".into() });
        }
        let actual = sha256_bytes(&self.buf);
        if actual != self.ann.sha256 {
            return Err(TransferError::Checksum { expected: self.ann.sha256, actual });
        }
        Ok(self.buf)
    }
}

/// How [`ship`] publishes.
#[derive(Debug, Clone)]
pub struct ShipOptions {
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// How long to wait for the broker at each step (connect, acknowledgements).
    pub timeout: Duration,
    /// Clear the chunks of the upload this one replaces, so the broker does not keep every version forever.
    pub clear_previous: bool,
}

impl Default for ShipOptions {
    fn default() -> Self {
        Self { chunk_size: DEFAULT_CHUNK_SIZE, timeout: Duration::from_secs(30), clear_previous: true }
    }
}

/// What [`ship`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ShipReport {
    /// The announcement now retained on the broker.
    pub announcement: Announcement,
    /// The announcement topic.
    pub topic: String,
    /// The upload this one replaced, if any, and whether its chunks were cleared.
    pub replaced: Option<String>,
}

/// Publishes `bundle` (packed as its deterministic `.tar`) to `<prefix>/models/<name>`, using the connection
/// settings (host, TLS, credentials) of `cfg` with its own client id. Calls `progress(sent, total)` after each
/// acknowledged chunk. Returns once the broker has acknowledged every chunk and the announcement.
pub async fn ship(
    cfg: &MqttConfig,
    bundle: &Bundle,
    opts: &ShipOptions,
    mut progress: impl FnMut(u32, u32),
) -> Result<ShipReport, TransferError> {
    let m = bundle.manifest();
    let tmp = tempfile::NamedTempFile::new().map_err(|e| TransferError::Connection(format!("temporary file: {e}")))?;
    bundle::pack_tar(bundle, tmp.path())?;
    let archive = std::fs::read(tmp.path())
        .map_err(|e| TransferError::Connection(format!("reading {}: {e}", tmp.path().display())))?;
    let ann = Announcement::describe(&m.name, &m.version.to_string(), &archive, opts.chunk_size)?;
    let topics = cfg.topics()?;
    let topic = topics.models(&m.name)?;

    let client_id = format!("{}-ship-{}", cfg.client_id(), std::process::id());
    let mut mopts = cfg.client_options(&client_id)?;
    // rumqttc's default 10 KiB limit would refuse every chunk; the incoming side only sees an announcement.
    mopts.set_clean_session(true).set_max_packet_size(1024 * 1024, MAX_CHUNK_SIZE as usize + 64 * 1024);
    let (client, mut el) = AsyncClient::new(mopts, 64);
    let t = opts.timeout;
    within(t, wait_for(&mut el, |e| matches!(e, Event::Incoming(Incoming::ConnAck(_))))).await??;

    // The announcement now retained tells which upload to clear afterwards.
    client.subscribe(&topic, QoS::AtLeastOnce).await.map_err(conn_err)?;
    // Brokers deliver a retained message around the SUBACK; a second after it without one means there is none.
    let mut previous = None;
    let mut suback_at: Option<tokio::time::Instant> = None;
    within(t, async {
        loop {
            let wait = suback_at.map_or(t, |at| RETAINED_WAIT.saturating_sub(at.elapsed()));
            let Ok(ev) = tokio::time::timeout(wait, el.poll()).await else { return Ok(()) };
            match ev.map_err(conn_err)? {
                Event::Incoming(Incoming::SubAck(_)) => suback_at = Some(tokio::time::Instant::now()),
                Event::Incoming(Incoming::Publish(p)) if p.topic == topic && p.retain => {
                    previous = serde_json::from_slice::<Announcement>(&p.payload).ok();
                    if suback_at.is_some() {
                        return Ok::<_, TransferError>(());
                    }
                }
                _ => {}
            }
        }
    })
    .await??;
    client.unsubscribe(&topic).await.map_err(conn_err)?;

    let total = ann.chunk_count();
    let mut acked = 0u32;
    for (i, chunk) in archive.chunks(ann.chunk_size as usize).enumerate() {
        let ct = topics.model_chunk(&m.name, &ann.transfer, i as u32)?;
        client.publish(ct, QoS::AtLeastOnce, true, chunk.to_vec()).await.map_err(conn_err)?;
        // Wait for acknowledgements as we go so at most the client's window is outstanding.
        while acked + 8 < i as u32 + 1 {
            within(t, wait_for(&mut el, |e| matches!(e, Event::Incoming(Incoming::PubAck(_))))).await??;
            acked += 1;
            progress(acked, total);
        }
    }
    while acked < total {
        within(t, wait_for(&mut el, |e| matches!(e, Event::Incoming(Incoming::PubAck(_))))).await??;
        acked += 1;
        progress(acked, total);
    }
    let body = serde_json::to_vec(&ann).map_err(|e| TransferError::Malformed(e.to_string()))?;
    client.publish(&topic, QoS::AtLeastOnce, true, body).await.map_err(conn_err)?;
    within(t, wait_for(&mut el, |e| matches!(e, Event::Incoming(Incoming::PubAck(_))))).await??;

    let mut replaced = None;
    if let Some(old) = previous.filter(|p| p.transfer != ann.transfer && p.name == m.name) {
        if opts.clear_previous && is_hex(&old.transfer, TRANSFER_ID_LEN) {
            let n = old.chunk_count();
            for i in 0..n {
                let ct = topics.model_chunk(&m.name, &old.transfer, i)?;
                client.publish(ct, QoS::AtLeastOnce, true, Vec::new()).await.map_err(conn_err)?;
                within(t, wait_for(&mut el, |e| matches!(e, Event::Incoming(Incoming::PubAck(_))))).await??;
            }
        }
        replaced = Some(format!("{} {} ({})", old.name, old.version, old.transfer));
    }
    client.disconnect().await.map_err(conn_err)?;
    let _ =
        within(Duration::from_secs(2), wait_for(&mut el, |e| matches!(e, Event::Outgoing(Outgoing::Disconnect)))).await;
    tracing::info!(model = %m.name, version = %m.version, transfer = %ann.transfer, chunks = total, bytes = ann.size,
        "bundle shipped over MQTT");
    Ok(ShipReport { announcement: ann, topic, replaced })
}

fn conn_err(e: impl std::fmt::Display) -> TransferError {
    TransferError::Connection(e.to_string())
}

async fn within<T>(t: Duration, f: impl std::future::Future<Output = T>) -> Result<T, TransferError> {
    tokio::time::timeout(t, f).await.map_err(|_| TransferError::Timeout(t))
}

async fn wait_for(el: &mut EventLoop, want: impl Fn(&Event) -> bool) -> Result<(), TransferError> {
    loop {
        let ev = el.poll().await.map_err(conn_err)?;
        if want(&ev) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn reassembles_in_any_order_and_checks_every_chunk() {
        let data = archive(10_000);
        let ann = Announcement::describe("m", "1.0.0", &data, 3000).unwrap();
        assert_eq!(ann.chunk_count(), 4);
        let json = serde_json::to_vec(&ann).unwrap();
        let parsed = Announcement::parse(&json, "m", 1 << 20).unwrap();
        assert_eq!(parsed, ann);
        let mut asm = Assembly::new(parsed);
        let chunks: Vec<&[u8]> = data.chunks(3000).collect();
        assert!(!asm.add(3, chunks[3]).unwrap());
        assert!(matches!(asm.add(1, chunks[2]), Err(TransferError::BadChunk { index: 1, .. })));
        assert!(matches!(asm.add(9, chunks[0]), Err(TransferError::BadChunk { index: 9, .. })));
        assert!(!asm.add(1, chunks[1]).unwrap());
        assert!(!asm.add(1, chunks[1]).unwrap(), "a repeat is ignored");
        assert!(!asm.add(0, chunks[0]).unwrap());
        assert_eq!(asm.progress(), (3, 4));
        assert!(asm.add(2, chunks[2]).unwrap());
        assert_eq!(asm.finish().unwrap(), data);
    }

    #[test]
    fn rejects_inconsistent_announcements() {
        let data = archive(5000);
        let good = Announcement::describe("m", "1", &data, 1000).unwrap();
        let check = |f: &dyn Fn(&mut Announcement), want: &str| {
            let mut a = good.clone();
            f(&mut a);
            let err = Announcement::parse(&serde_json::to_vec(&a).unwrap(), "m", 1 << 20).unwrap_err().to_string();
            assert!(err.contains(want), "{err} does not mention {want}");
        };
        check(&|a| a.format = 2, "format 2");
        check(&|a| a.name = "other".into(), "arrived on the topic");
        check(&|a| a.transfer = "0000000000000000".into(), "transfer");
        check(&|a| a.size = 9000, "chunk hashes");
        check(&|a| a.chunks[0] = "xyz".into(), "not 64 lowercase hex");
        check(&|a| a.chunk_size = MAX_CHUNK_SIZE + 1, "chunk_size");
        let err = Announcement::parse(&serde_json::to_vec(&good).unwrap(), "m", 4999).unwrap_err();
        assert!(matches!(err, TransferError::TooLarge { size: 5000, max: 4999 }));
        assert!(matches!(Announcement::parse(b"{nope", "m", 1), Err(TransferError::Malformed(_))));
        let mut extra = serde_json::to_value(&good).unwrap();
        extra["surprise"] = 1.into();
        assert!(matches!(
            Announcement::parse(&serde_json::to_vec(&extra).unwrap(), "m", 1 << 20),
            Err(TransferError::Malformed(_))
        ));
    }

    #[test]
    fn whole_archive_hash_is_checked() {
        let data = archive(4000);
        let mut ann = Announcement::describe("m", "1", &data, 1000).unwrap();
        // Chunk hashes that match data other than what the archive hash covers.
        let other = archive(4001)[1..].to_vec();
        ann.chunks = other.chunks(1000).map(sha256_bytes).collect();
        let mut asm = Assembly::new(ann);
        for (i, c) in other.chunks(1000).enumerate() {
            asm.add(i as u32, c).unwrap();
        }
        assert!(matches!(asm.finish(), Err(TransferError::Checksum { .. })));
    }
}
