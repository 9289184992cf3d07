//! Bundles received over MQTT (`models.receive`): announcement → chunks → checksum → the model store's install
//! (signature, hashes) → activation (golden set on this box's provider) → swap, with each step reported in
//! `model/state`'s `transfer`. The wire format is `attrd::mqtt::transfer`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use attrd::config::ModelsConfig;
use attrd::engine::EngineConfig;
use attrd::models::{self, ModelError, ModelStore};
use attrd::mqtt::transfer::{Announcement, Assembly, TransferError};
use attrd::mqtt::{ModelMessages, ModelTopic, PublisherHandle, PublisherState};
use attrd::util::{error_chain, now_rfc3339};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::slot::ModelSlot;

/// Re-requests of a transfer's chunks (by subscribing again) before it is given up.
const MAX_RETRIES: u32 = 3;

struct Pending {
    assembly: Assembly,
    filter: String,
    deadline: Instant,
    retries: u32,
    last_logged: u32,
}

pub(crate) async fn run(
    mut rx: ModelMessages,
    store: ModelStore,
    cfg: ModelsConfig,
    engine_cfg: EngineConfig,
    slot: Arc<ModelSlot>,
    connection: watch::Receiver<PublisherState>,
) {
    let mqtt = slot.mqtt().clone();
    let topics = mqtt.topics().clone();
    let filters: Vec<String> = if cfg.receive.iter().any(|n| n == "*") {
        topics.models_filter(None).into_iter().collect()
    } else {
        cfg.receive.iter().filter_map(|n| topics.models_filter(Some(n)).ok()).collect()
    };
    for f in &filters {
        if let Err(e) = mqtt.subscribe(f.clone()) {
            tracing::error!(filter = %f, error = %e, "cannot subscribe to model announcements");
        }
    }
    tracing::info!(filters = ?filters, activate = cfg.receive_activate, "receiving model bundles over MQTT");

    let mut pending: HashMap<String, Pending> = HashMap::new();
    // Uploads that failed verification: not fetched again on every reconnect (until the next restart).
    let mut rejected: HashSet<String> = HashSet::new();
    // Installs run beside this loop, which must keep taking messages: an install and self-test can take minutes, and
    // the publisher drops what this loop does not take in time. They run one at a time (`turn`), and report back
    // here with the upload's checksum and whether it was refused.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, bool)>();
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    // Archives handed to an install (checksum → size): in memory until their install is done.
    let mut installing: HashMap<String, u64> = HashMap::new();
    // An announcement was put off because the transfers before it hold `receive_max_bytes`: once memory is freed,
    // the retained announcements are asked for again (the broker keeps them; this loop keeps nothing of them).
    let mut deferred = false;
    // Uploads given up for missing chunks (checksum → the connection's reconnect count then): not fetched again when
    // the broker merely resends their retained announcement (as it does for `resume`), only when the upload is
    // announced anew or after a reconnect. Otherwise the next `resume` would start the given-up upload again ahead
    // of the ones waiting for its memory, and could do so for ever.
    let mut given_up: HashMap<String, u64> = HashMap::new();
    loop {
        let next_deadline = pending.values().map(|p| p.deadline).min();
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            Some((sha, refused)) = done_rx.recv() => {
                installing.remove(&sha);
                if refused {
                    rejected.insert(sha);
                }
                resume(&mut deferred, &mqtt, &filters);
                continue;
            }
            _ = sleep_until(next_deadline) => {
                let reconnects = connection.borrow().reconnects;
                let expired = expire(&mut pending, &mqtt, &slot, &cfg);
                given_up.extend(expired.iter().map(|sha| (sha.clone(), reconnects)));
                if !expired.is_empty() {
                    resume(&mut deferred, &mqtt, &filters);
                }
                continue;
            }
        };
        match msg.topic {
            ModelTopic::Announcement { name } => {
                if msg.payload.is_empty() {
                    tracing::info!(model = %name, "model announcement cleared");
                    if stop_receiving(&mut pending, &name, &mqtt).is_some() {
                        resume(&mut deferred, &mqtt, &filters);
                    }
                    continue;
                }
                let ann = match Announcement::parse(&msg.payload, &name, cfg.receive_max_bytes) {
                    Ok(a) => a,
                    Err(e) => {
                        let sha = attrd::bundle::sha256_bytes(&msg.payload);
                        if rejected.insert(sha) {
                            tracing::warn!(model = %name, error = %error_chain(&e), "model announcement rejected");
                            report(&slot, &name, None, "rejected", Some(&e));
                        }
                        continue;
                    }
                };
                if rejected.contains(&ann.sha256) {
                    tracing::debug!(model = %name, transfer = %ann.transfer, "announcement of a rejected upload ignored");
                    continue;
                }
                if let Some(&at) = given_up.get(&ann.sha256) {
                    if msg.retain && connection.borrow().reconnects == at {
                        tracing::debug!(model = %name, transfer = %ann.transfer,
                            "announcement of an upload given up resent; not fetched again until announced anew");
                        continue;
                    }
                    given_up.remove(&ann.sha256);
                }
                if installing.contains_key(&ann.sha256) {
                    tracing::debug!(model = %name, transfer = %ann.transfer, "announced upload is being installed");
                    continue;
                }
                let id = models::id_of(&ann.name, &ann.version);
                // Opening an installed bundle hashes its files: not on the async workers.
                let s = store.clone();
                if tokio::task::spawn_blocking(move || s.contains(&id)).await.unwrap_or(false) {
                    tracing::debug!(model = %name, version = %ann.version, "announced bundle already installed");
                    if stop_receiving(&mut pending, &name, &mqtt).is_some() {
                        resume(&mut deferred, &mqtt, &filters);
                    }
                    continue;
                }
                if pending.get(&name).is_some_and(|p| p.assembly.announcement().transfer == ann.transfer) {
                    continue;
                }
                let Ok(filter) = topics.model_chunks_filter(&ann.name, &ann.transfer) else { continue };
                if stop_receiving(&mut pending, &name, &mqtt).is_some() {
                    resume(&mut deferred, &mqtt, &filters);
                }
                // Every transfer is assembled in memory, and a finished one stays there until installed: together
                // they may hold `receive_max_bytes`, so that whoever may announce cannot make this box run out of
                // memory by announcing many names at once. A single upload always fits once the others are done.
                let held = pending.values().map(|p| p.assembly.announcement().size).sum::<u64>()
                    + installing.values().sum::<u64>();
                if held.saturating_add(ann.size) > cfg.receive_max_bytes {
                    tracing::info!(model = %name, version = %ann.version, bytes = ann.size, held,
                        max = cfg.receive_max_bytes,
                        "model bundle announced; waiting for the transfers before it (models.receive_max_bytes)");
                    report(&slot, &name, Some(&ann), "waiting", None);
                    deferred = true;
                    continue;
                }
                tracing::info!(model = %name, version = %ann.version, transfer = %ann.transfer, bytes = ann.size,
                    chunks = ann.chunk_count(), "model bundle announced; receiving");
                report(&slot, &name, Some(&ann), "receiving", None);
                if let Err(e) = mqtt.subscribe(filter.clone()) {
                    tracing::error!(error = %e, "cannot subscribe to the bundle's chunks");
                }
                let deadline = Instant::now() + cfg.receive_timeout;
                pending.insert(
                    name,
                    Pending { assembly: Assembly::new(ann), filter, deadline, retries: 0, last_logged: 0 },
                );
            }
            ModelTopic::Chunk { name, transfer, index } => {
                let Some(p) = pending.get_mut(&name) else { continue };
                if p.assembly.announcement().transfer != transfer || msg.payload.is_empty() {
                    continue;
                }
                match p.assembly.add(index, &msg.payload) {
                    Ok(false) => {
                        let (got, total) = p.assembly.progress();
                        // Progress every tenth of the way, not every chunk.
                        if got * 10 / total > p.last_logged * 10 / total {
                            tracing::info!(model = %name, received = got, chunks = total, "receiving model bundle");
                            p.last_logged = got;
                        }
                    }
                    Ok(true) => {
                        let Some(p) = stop_receiving(&mut pending, &name, &mqtt) else { continue };
                        let ann = p.assembly.announcement().clone();
                        match p.assembly.finish() {
                            Ok(archive) => {
                                installing.insert(ann.sha256.clone(), ann.size);
                                let (store, cfg, engine_cfg, slot) =
                                    (store.clone(), cfg.clone(), engine_cfg.clone(), slot.clone());
                                let (done, turn) = (done_tx.clone(), turn.clone());
                                tokio::spawn(async move {
                                    // Reports back even if the install panics: its memory must be counted free.
                                    let mut report_back = Done { tx: done, sha: ann.sha256.clone(), refused: true };
                                    let _turn = turn.lock().await;
                                    let result = install(archive, &ann, &store, &cfg, &engine_cfg, &slot).await;
                                    if let Err(e) = &result {
                                        tracing::error!(model = %name, version = %ann.version, error = %e,
                                            "received bundle rejected; the active model keeps serving");
                                        report_text(&slot, &name, Some(&ann), "rejected", Some(e.clone()));
                                    }
                                    report_back.refused = result.is_err();
                                });
                            }
                            Err(e) => {
                                rejected.insert(ann.sha256.clone());
                                tracing::error!(model = %name, error = %error_chain(&e), "received bundle corrupt");
                                report(&slot, &name, Some(&ann), "rejected", Some(&e));
                                resume(&mut deferred, &mqtt, &filters);
                            }
                        }
                    }
                    Err(e) => {
                        // A bad chunk on a retained topic stays bad: give the upload up rather than wait.
                        let ann = p.assembly.announcement().clone();
                        if stop_receiving(&mut pending, &name, &mqtt).is_none() {
                            continue;
                        }
                        rejected.insert(ann.sha256.clone());
                        tracing::error!(model = %name, error = %error_chain(&e), "received bundle chunk corrupt");
                        report(&slot, &name, Some(&ann), "rejected", Some(&e));
                        resume(&mut deferred, &mqtt, &filters);
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Tells the receive loop that an install is over (see `run`), when dropped: also when the install panicked.
struct Done {
    tx: mpsc::UnboundedSender<(String, bool)>,
    sha: String,
    refused: bool,
}

impl Drop for Done {
    fn drop(&mut self) {
        let _ = self.tx.send((std::mem::take(&mut self.sha), self.refused));
    }
}

/// Ends the transfer of `name` being received, if any: its chunks are no longer asked for, and the memory it counted
/// against `receive_max_bytes` is free once the caller is done with what it returns.
fn stop_receiving(pending: &mut HashMap<String, Pending>, name: &str, mqtt: &PublisherHandle) -> Option<Pending> {
    let p = pending.remove(name)?;
    let _ = mqtt.unsubscribe(p.filter.clone());
    Some(p)
}

/// After memory held by transfers was freed: asks the broker again for the retained announcements, when one of them
/// was put off for want of it. Those already installed, being installed or being received are skipped as usual.
fn resume(deferred: &mut bool, mqtt: &PublisherHandle, filters: &[String]) {
    if !std::mem::take(deferred) {
        return;
    }
    tracing::info!("memory for model transfers freed; fetching the announcements put off");
    for f in filters {
        // Subscribing again to a filter already held replaces the subscription, and the broker resends the retained
        // messages that match (MQTT 3.1.1, 3.8.4). No unsubscribe first: a refused subscribe after it would leave the
        // filter out of the ones restored at every reconnect. A refused one is tried again at the next chance.
        if let Err(e) = mqtt.subscribe(f.clone()) {
            tracing::warn!(filter = %f, error = %e, "cannot ask for the model announcements again yet");
            *deferred = true;
        }
    }
}

/// Chunks that did not arrive in time are asked for again (subscribing again makes the broker resend retained
/// messages); after [`MAX_RETRIES`] the upload is given up until its next announcement. Returns the checksums of
/// the uploads given up (whose memory is free now).
fn expire(
    pending: &mut HashMap<String, Pending>,
    mqtt: &PublisherHandle,
    slot: &ModelSlot,
    cfg: &ModelsConfig,
) -> Vec<String> {
    let mut gave_up = Vec::new();
    let now = Instant::now();
    let expired: Vec<String> = pending.iter().filter(|(_, p)| p.deadline <= now).map(|(n, _)| n.clone()).collect();
    for name in expired {
        let Some(p) = pending.get_mut(&name) else { continue };
        let (got, total) = p.assembly.progress();
        if p.retries < MAX_RETRIES {
            p.retries += 1;
            p.deadline = now + cfg.receive_timeout;
            tracing::warn!(model = %name, received = got, chunks = total, retry = p.retries,
                "model bundle chunks missing; asking the broker again");
            // Subscribing again replaces the subscription and makes the broker resend the retained chunks.
            let _ = mqtt.subscribe(p.filter.clone());
        } else if let Some(p) = stop_receiving(pending, &name, mqtt) {
            let ann = p.assembly.announcement().clone();
            let why = format!("only {got} of {total} chunks arrived after {} tries", MAX_RETRIES + 1);
            tracing::error!(model = %name, error = %why, "model bundle transfer given up");
            report_text(slot, &name, Some(&ann), "failed", Some(why));
            gave_up.push(ann.sha256.clone());
        }
    }
    gave_up
}

async fn install(
    archive: Vec<u8>,
    ann: &Announcement,
    store: &ModelStore,
    cfg: &ModelsConfig,
    engine_cfg: &EngineConfig,
    slot: &Arc<ModelSlot>,
) -> Result<(), String> {
    let (store, full_cfg, activate) = (store.clone(), engine_cfg.clone(), cfg.receive_activate);
    let engine_cfg = full_cfg.clone();
    let name = ann.name.clone();
    // What was announced is what may be installed: the signature says who made a bundle, not which one was shipped.
    let expected = (ann.name.clone(), ann.version.clone());
    report(slot, &name, Some(ann), "installing", None);
    // Install and the golden-set self-test block (file I/O, inference): keep them off the async workers.
    let outcome = tokio::task::spawn_blocking(move || {
        let b = match store.install_tar_as(std::io::Cursor::new(archive), Some((&expected.0, &expected.1))) {
            Ok(b) => b,
            Err(ModelError::AlreadyInstalled { label, .. }) => return Err(format!("{label} is already installed")),
            Err(e) => return Err(error_chain(&e)),
        };
        let id = b.dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !activate {
            return Ok((b, None));
        }
        match store.activate(&id, &engine_cfg.foreground()) {
            Ok((engine, report)) => Ok((store.get(&id).map_err(|e| error_chain(&e))?, Some((engine, report)))),
            Err(e) => Err(format!("installed as {id} but not activated: {}", error_chain(&e))),
        }
    })
    .await
    .map_err(|e| format!("install thread: {e}"))??;
    match outcome {
        (b, Some((engine, report))) => {
            slot.swap(engine, report, b.clone());
            super::upgrade::spawn(slot.clone(), b, &full_cfg);
            tracing::info!(model = %name, version = %ann.version, "received bundle activated");
            self::report(slot, &name, Some(ann), "activated", None);
        }
        (b, None) => {
            tracing::info!(bundle = %b.label(), "received bundle installed; activate it with `attrd model activate`");
            self::report(slot, &name, Some(ann), "installed", None);
        }
    }
    Ok(())
}

fn report(slot: &ModelSlot, name: &str, ann: Option<&Announcement>, status: &str, err: Option<&TransferError>) {
    report_text(slot, name, ann, status, err.map(|e| error_chain(e)));
}

fn report_text(slot: &ModelSlot, name: &str, ann: Option<&Announcement>, status: &str, err: Option<String>) {
    slot.transfer_event(json!({
        "name": name,
        "version": ann.map(|a| a.version.clone()),
        "transfer": ann.map(|a| a.transfer.clone()),
        "sha256": ann.map(|a| a.sha256.clone()),
        "status": status,
        "error": err,
        "at": now_rfc3339(),
    }));
}
