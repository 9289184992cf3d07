//! The soak, in one run: a stream of distinct real photos through the hot folder of a real `attrd run`
//! (default fashion model, CPU), while the broker is stopped and restarted 3 times and the daemon is killed with
//! SIGKILL 5 times, some of the faults overlapping. Every photo must yield exactly one `message_id` at a persistent
//! QoS 1 subscriber (repeats only with the same id), and every file must end in `done/`.
//!
//! `ATTRD_SOAK_IMAGES` sets the number of photos: 2,000 by default, the figure (about 30 s in the debug
//! build of `./scripts/test`; `scripts/soak` runs it on the release build). The fault counts do not scale; the
//! waves the photos arrive in do.

use crate::common::{Mosquitto, fashion_rows, repo};
use crate::daemon::{Daemon, Node, wait_ready_within};
use crate::mqtt::Sub;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const KILLS: usize = 5;
const BROKER_RESTARTS: usize = 3;
/// Photos arrive in this many waves, with the faults placed among them (see the plan in the test).
const WAVES: usize = 8;

/// What the subscriber has seen so far, tallied incrementally (re-parsing thousands of payloads every poll would
/// compete with the daemon for this machine's two cores).
#[derive(Default)]
struct Tally {
    parsed: usize,
    messages: usize,
    /// SKU → message_id → how many times it arrived.
    ids: BTreeMap<String, BTreeMap<String, usize>>,
    /// Results that are wrong in themselves (unknown SKU, wrong image, wrong node, …).
    bad: Vec<String>,
}

impl Tally {
    fn update(&mut self, sub: &Sub, node: &str, expect: &BTreeMap<String, String>) {
        let prefix = format!("attrd/{node}/results/");
        let msgs = sub.messages();
        for m in &msgs[self.parsed..] {
            let Some(topic_sku) = m.topic.strip_prefix(&prefix) else { continue };
            self.messages += 1;
            let v = m.json();
            let sku = v["sku"].as_str().unwrap_or_default().to_string();
            let id = v["message_id"].as_str().unwrap_or_default().to_string();
            let problem = if sku != topic_sku {
                Some("SKU differs from the topic's")
            } else if !expect.contains_key(&sku) {
                Some("unknown SKU")
            } else if v["source"]["image_sha256"].as_str() != expect.get(&sku).map(String::as_str) {
                Some("image_sha256 is not that of the SKU's photo")
            } else if id.is_empty() || v["schema_version"] != 1 || v["node"] != node {
                Some("bad envelope")
            } else if v["model"]["name"] != "fashion-attributes" || v["model"]["execution_provider"] != "cpu" {
                Some("unexpected model")
            } else if v["attributes"].as_object().is_none_or(|a| a.is_empty()) {
                Some("no attributes")
            } else {
                None
            };
            if let Some(p) = problem {
                self.bad.push(format!("{p}: {} {}", m.topic, m.text()));
            }
            *self.ids.entry(sku).or_default().entry(id).or_default() += 1;
        }
        self.parsed = msgs.len();
    }

    fn duplicates(&self) -> usize {
        self.messages - self.ids.values().map(BTreeMap::len).sum::<usize>()
    }
}

/// The test's world: broker, node, subscriber, the running daemon, and what has been done to them.
struct Soak {
    broker: Mosquitto,
    node: Node,
    sub: Sub,
    daemon: Option<Daemon>,
    /// SKU → SHA-256 of its photo, for every photo dropped so far.
    expect: BTreeMap<String, String>,
    tally: Tally,
    kills: usize,
    broker_restarts: usize,
    broker_up: bool,
    broker_stopped_at: Instant,
    started: Instant,
}

impl Soak {
    fn say(&self, what: &str) {
        let done = self.node.files_in("done").len();
        eprintln!(
            "soak {:>6.1}s  {what:<40} dropped {:>5}  done {done:>5}  SKUs with results {:>5}  duplicates {:>4}",
            self.started.elapsed().as_secs_f64(),
            self.expect.len(),
            self.tally.ids.len(),
            self.tally.duplicates(),
        );
    }

    /// The daemon's log (every start), the broker's and the subscriber's state, for a failure message.
    fn context(&self) -> String {
        let log = self.node.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = |v: &[&str], n: usize| v[v.len().saturating_sub(n)..].join("\n");
        let problems: Vec<&str> = lines.iter().copied().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        let mlog = self.broker.log();
        let mlines: Vec<&str> = mlog.lines().collect();
        let missing: Vec<&String> = self.expect.keys().filter(|k| !self.tally.ids.contains_key(*k)).take(20).collect();
        format!(
            "after {:.1}s, {} kills, {} broker restarts; hot folder {} files, done {}, failed {}, SKUs with results \
             {}/{}, first missing: {missing:?}\n--- attrd log: last 30 of {} warnings and errors ---\n{}\n\
             --- attrd log: last 20 of {} lines ---\n{}\n--- mosquitto log: last 15 lines ---\n{}",
            self.started.elapsed().as_secs_f64(),
            self.kills,
            self.broker_restarts,
            self.node.files_in("").len(),
            self.node.files_in("done").len(),
            self.node.files_in("failed").len(),
            self.tally.ids.len(),
            self.expect.len(),
            problems.len(),
            tail(&problems, 30),
            lines.len(),
            tail(&lines, 20),
            tail(&mlines, 15),
        )
    }

    async fn start_daemon(&mut self) {
        assert!(self.daemon.is_none());
        let mut d = self.node.start();
        wait_ready_within(&self.node, &mut d, 60).await;
        self.daemon = Some(d);
        self.say(if self.broker_up { "daemon started" } else { "daemon started (broker down)" });
    }

    fn kill_daemon(&mut self) {
        let mut d = self.daemon.take().expect("a running daemon");
        if let Some(status) = d.try_wait().unwrap() {
            panic!("attrd had exited by itself ({status}) before kill {}:\n{}", self.kills + 1, self.context());
        }
        d.kill().unwrap(); // SIGKILL
        d.wait().unwrap();
        self.kills += 1;
        self.say(&format!("SIGKILL {}/{KILLS}", self.kills));
    }

    fn stop_broker(&mut self) {
        self.broker.stop();
        self.broker_up = false;
        self.broker_stopped_at = Instant::now();
        self.say(&format!("broker stopped ({}/{BROKER_RESTARTS})", self.broker_restarts + 1));
    }

    /// Starts the broker again, once it has been away for at least a second (longer than the daemon's reconnect
    /// backoff, so it does notice the outage).
    async fn restart_broker(&mut self) {
        let away = self.broker_stopped_at.elapsed();
        if away < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_secs(1) - away).await;
        }
        self.broker.restart();
        self.broker_up = true;
        self.broker_restarts += 1;
        self.say(&format!("broker restarted {}/{BROKER_RESTARTS}", self.broker_restarts));
    }

    /// Copies photos in as `<SKU>_front.jpg` (written under a dot-name and renamed, like tethering software does).
    fn drop_wave(&mut self, photos: &[(String, PathBuf)]) {
        for (sku, path) in photos {
            let bytes = std::fs::read(path).unwrap();
            self.expect.insert(sku.clone(), hex::encode(Sha256::digest(&bytes)));
            let tmp = self.node.hot().join(format!(".{sku}.part"));
            std::fs::write(&tmp, &bytes).unwrap();
            std::fs::rename(&tmp, self.node.hot().join(format!("{sku}_front.jpg"))).unwrap();
        }
        self.say(&format!("wave of {} photos dropped", photos.len()));
    }

    /// Polls `cond` every 25 ms (tallying the subscriber's messages first); fails with the context after `secs`.
    async fn wait(&mut self, what: &str, secs: u64, cond: impl Fn(&Soak) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.tally.update(&self.sub, &self.node.name, &self.expect);
            if cond(self) {
                return;
            }
            if let Some(d) = self.daemon.as_mut()
                && let Some(status) = d.try_wait().unwrap()
            {
                self.daemon = None;
                panic!("attrd exited by itself ({status}) while waiting for {what}:\n{}", self.context());
            }
            if Instant::now() > deadline {
                panic!("timed out after {secs}s waiting for {what}:\n{}", self.context());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `base + n` files are in `done/`: with `base` the photos dropped before the current wave, the
    /// earlier waves are through and the current one is partly done, so the next fault hits it in flight.
    async fn wait_done(&mut self, base: usize, n: usize) {
        let target = base + n.max(1);
        self.wait(&format!("{target} files in done/"), 180, |s| s.node.files_in("done").len() >= target).await;
    }
}

/// `ATTRD_SOAK_IMAGES` distinct photos, 3 broker outages and 5 SIGKILLs in one run: nothing lost, one `message_id`
/// per photo, every file in `done/`, and the daemon still stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_kill_9_and_broker_restarts_lose_nothing() {
    let n: usize = std::env::var("ATTRD_SOAK_IMAGES").ok().map_or(2000, |v| v.parse().expect("ATTRD_SOAK_IMAGES"));
    assert!(n >= WAVES * 4, "ATTRD_SOAK_IMAGES={n}: need at least {} photos", WAVES * 4);
    // Distinct catalogue photos (rows 1000…, away from the ones other tests use), as SKUs SOAK0000, SOAK0001, …
    let rows = fashion_rows();
    assert!(rows.len() >= 1000 + n, "{} catalogue rows, need {}", rows.len(), 1000 + n);
    let photos: Vec<(String, PathBuf)> =
        rows.into_iter().skip(1000).take(n).enumerate().map(|(i, (_, p, _))| (format!("SOAK{i:04}"), p)).collect();
    let waves: Vec<&[(String, PathBuf)]> = photos.chunks(n.div_ceil(WAVES)).collect();
    assert_eq!(waves.len(), WAVES);

    // A persistent broker and a persistent QoS 1 subscriber: what the broker queued for the subscriber survives a
    // broker restart, so a result missing at the end is one the daemon never published. The queue is unbounded
    // (mosquitto drops beyond 1,000 queued messages per client by default): a replay after an outage can publish the
    // daemon's backlog faster than the subscriber takes it, and a drop there would not be the daemon's.
    let broker = Mosquitto::start_with_listener(crate::common::free_port(), true, "max_queued_messages 0");
    let node = Node::with_bundle("it-soak", broker.port, &repo().join("models/fashion-lite0-int8"));
    let sub = Sub::start(
        broker.port,
        "it-soak-sub",
        &[&format!("attrd/{}/results/#", node.name), &format!("attrd/{}/available", node.name)],
        true,
    )
    .await;
    let mut s = Soak {
        broker,
        node,
        sub,
        daemon: None,
        expect: BTreeMap::new(),
        tally: Tally::default(),
        kills: 0,
        broker_restarts: 0,
        broker_up: true,
        broker_stopped_at: Instant::now(),
        started: Instant::now(),
    };
    let third = |w: &[(String, PathBuf)]| w.len() / 3;

    // 1. Photos waiting before the first start; killed while they are being worked on.
    s.drop_wave(waves[0]);
    s.start_daemon().await;
    s.wait_done(0, third(waves[0])).await;
    s.kill_daemon();
    s.start_daemon().await;

    // 2. The broker goes away mid-wave; the daemon is killed while it is away and started again without it.
    let base = s.expect.len();
    s.drop_wave(waves[1]);
    s.wait_done(base, third(waves[1])).await;
    s.stop_broker();
    s.wait_done(base, 2 * third(waves[1])).await;
    s.kill_daemon();
    s.start_daemon().await;

    // 3. More photos while the broker is still down; it comes back mid-wave. The next wave follows at once, and the
    // daemon is killed as soon as the replay of the outage's backlog reaches the subscriber.
    let base = s.expect.len();
    s.drop_wave(waves[2]);
    s.wait_done(base, third(waves[2])).await;
    let had = s.tally.ids.len();
    s.restart_broker().await;
    s.drop_wave(waves[3]);
    s.wait("the replay after the first outage to begin", 180, |s| s.tally.ids.len() > had).await;
    s.kill_daemon();
    s.start_daemon().await;

    // 4. A broker outage the daemon rides out alone.
    let base = s.expect.len();
    s.drop_wave(waves[4]);
    s.wait_done(base, third(waves[4])).await;
    s.stop_broker();
    s.wait_done(base, 2 * third(waves[4])).await;
    s.restart_broker().await;

    // 5. Killed, and the broker stopped while the daemon is dead; started again without a broker.
    let base = s.expect.len();
    s.drop_wave(waves[5]);
    s.wait_done(base, third(waves[5])).await;
    s.kill_daemon();
    s.stop_broker();
    s.start_daemon().await;

    // 6. Photos while the broker is down; it comes back mid-wave, the last wave follows at once, and the daemon is
    // killed as soon as the replay of the backlog reaches the subscriber.
    let base = s.expect.len();
    s.drop_wave(waves[6]);
    s.wait_done(base, third(waves[6])).await;
    let had = s.tally.ids.len();
    s.restart_broker().await;
    s.drop_wave(waves[7]);
    s.wait("the replay after the last outage to begin", 180, |s| s.tally.ids.len() > had).await;
    s.kill_daemon();
    s.start_daemon().await;
    assert_eq!((s.kills, s.broker_restarts), (KILLS, BROKER_RESTARTS));
    // The broker really kept its state across each stop (else a loss could be the broker's, not the daemon's).
    let saved = s.broker.log().matches("Saving in-memory database").count();
    assert_eq!(saved, BROKER_RESTARTS, "mosquitto did not save its sessions on every stop:\n{}", s.context());

    // Everything arrives and every file leaves the hot folder. Generous: a 2-core machine, a debug daemon.
    let all: BTreeSet<String> = s.expect.keys().cloned().collect();
    let secs = 120 + n as u64 / 5;
    s.wait("a result for every photo and every file out of the hot folder", secs, |s| {
        s.tally.ids.len() == all.len() && s.node.files_in("").is_empty()
    })
    .await;
    // Late repeats (a replay racing the final tally) would be counted below; give them a moment to land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.tally.update(&s.sub, &s.node.name, &s.expect);

    let t = &s.tally;
    assert!(t.bad.is_empty(), "{} bad results, first: {:#?}", t.bad.len(), &t.bad[..t.bad.len().min(5)]);
    let got: BTreeSet<String> = t.ids.keys().cloned().collect();
    assert_eq!(got, all, "SKUs with results differ from the photos dropped");
    let split: Vec<_> = t.ids.iter().filter(|(_, ids)| ids.len() != 1).collect();
    assert!(split.is_empty(), "{} SKUs have results with different message_ids: {split:?}", split.len());

    // Every source file is in done/ (none in failed/ for good photos, none left, none missing).
    let failed = s.node.files_in("failed");
    let reasons: Vec<String> = failed
        .iter()
        .filter(|f| f.ends_with(".error.txt"))
        .map(|f| format!("{f}: {}", std::fs::read_to_string(s.node.hot().join("failed").join(f)).unwrap_or_default()))
        .collect();
    assert!(failed.is_empty(), "{} files in failed/: {reasons:#?}", failed.len());
    let in_done: BTreeSet<String> =
        s.node.files_in("done").iter().map(|f| f.trim_end_matches("_front.jpg").to_string()).collect();
    assert_eq!(in_done, all, "every file ends in done/");

    // Still alive after it all, and a graceful stop: SIGTERM, exit 0, a retained `stopped`.
    let mut d = s.daemon.take().unwrap();
    assert!(d.try_wait().unwrap().is_none(), "attrd died:\n{}", s.context());
    assert!(Command::new("kill").args(["-TERM", &d.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = d.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "attrd did not stop within 30s of SIGTERM:\n{}", s.context());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status} after SIGTERM:\n{}", s.context());
    let available = format!("attrd/{}/available", s.node.name);
    s.sub.wait_for("available=stopped", 10, |m| m.iter().any(|m| m.topic == available && m.text() == "stopped")).await;
    // Every result was acknowledged and deleted: nothing is left to be published again.
    let cfg = attrd::outbox::OutboxConfig {
        path: s.node.dir.path().join("outbox.sqlite3"),
        ..attrd::outbox::OutboxConfig::default()
    };
    let left = attrd::outbox::Outbox::open(&cfg).unwrap().depth();
    assert_eq!(left.messages, 0, "results left in the outbox after a graceful stop: {left:?}");

    eprintln!(
        "soak result: {n} images, {} results received ({} SKUs, 0 lost), {} duplicates (same message_id), \
         {} failed, {} SIGKILLs, {} broker restarts, {:.1}s",
        t.messages,
        t.ids.len(),
        t.duplicates(),
        failed.len(),
        s.kills,
        s.broker_restarts,
        s.started.elapsed().as_secs_f64(),
    );
}
