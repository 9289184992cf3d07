//! The MQTT publisher against a real mosquitto: nothing lost across broker restarts or a broker that is down at
//! boot, last will and graceful `stopped`, retained state restored, commands (valid, malformed, retained).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attrd::mqtt::{
    Connection, IncomingCommand, MqttConfig, MqttTlsConfig, Publisher, PublisherState, TopicError, Topics,
};
use attrd::outbox::{Outbox, OutboxConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::common::{Mosquitto, free_port};

#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) retain: bool,
}

impl Msg {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {:?}", self.topic, self.text()))
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A QoS 1 subscriber that keeps reconnecting (and re-subscribing) while the test runs.
pub(crate) struct Sub {
    msgs: Arc<Mutex<Vec<Msg>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sub {
    /// `persistent`: clean_session=false, so with a persistent broker nothing is missed while either side is down.
    pub(crate) async fn start(port: u16, client_id: &str, filters: &[&str], persistent: bool) -> Sub {
        Self::start_with(Self::options(port, client_id, persistent), filters).await
    }

    fn options(port: u16, client_id: &str, persistent: bool) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_session(!persistent).set_keep_alive(Duration::from_secs(5)).set_max_packet_size(1 << 20, 1 << 20);
        o
    }

    async fn start_with(o: MqttOptions, filters: &[&str]) -> Sub {
        let (client, mut el) = AsyncClient::new(o, 64);
        let filters: Vec<SubscribeFilter> =
            filters.iter().map(|f| SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)).collect();
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let msgs = msgs.clone();
            let mut ready = Some(ready_tx);
            async move {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            client.subscribe_many(filters.clone()).await.unwrap();
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => msgs.lock().unwrap().push(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        }),
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), ready_rx).await.expect("subscriber ready").unwrap();
        Sub { msgs, task }
    }

    pub(crate) fn messages(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    pub(crate) async fn wait_for(&self, what: &str, secs: u64, pred: impl Fn(&[Msg]) -> bool) -> Vec<Msg> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.messages();
            if pred(&m) {
                return m;
            }
            if tokio::time::Instant::now() > deadline {
                let tail: Vec<String> = m.iter().rev().take(5).map(|m| format!("{} {}", m.topic, m.text())).collect();
                panic!("timed out waiting for {what}; {} messages, last: {tail:#?}", m.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Payloads on one topic, in arrival order.
    pub(crate) fn on(&self, topic: &str) -> Vec<String> {
        self.messages().iter().filter(|m| m.topic == topic).map(Msg::text).collect()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mqtt_cfg(port: u16, node: &str) -> MqttConfig {
    MqttConfig {
        host: "127.0.0.1".into(),
        port,
        node: Some(node.into()),
        keep_alive: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(400),
        shutdown_timeout: Duration::from_secs(3),
        max_in_flight: 16,
        ..MqttConfig::default()
    }
}

fn outbox_in(dir: &tempfile::TempDir) -> Outbox {
    Outbox::open(&OutboxConfig { path: dir.path().join("outbox.sqlite3"), ..OutboxConfig::default() }).unwrap()
}

async fn wait_state(
    st: &watch::Receiver<PublisherState>,
    what: &str,
    secs: u64,
    pred: impl Fn(&PublisherState) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !pred(&st.borrow()) {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {:?}", *st.borrow());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_drained(outbox: &Outbox, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while outbox.depth().messages > 0 {
        assert!(tokio::time::Instant::now() < deadline, "outbox not drained: {:?}", outbox.depth());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks every received result against what was enqueued: known message id, same seq, `published_at` present.
fn check_results(got: &[Msg], sent: &HashMap<String, u64>) -> HashSet<String> {
    let mut seen = HashSet::new();
    for m in got {
        let v = m.json();
        let id = v["message_id"].as_str().unwrap_or_else(|| panic!("no message_id: {v}")).to_owned();
        let seq = sent.get(&id).unwrap_or_else(|| panic!("unknown message_id {id}"));
        assert_eq!(v["seq"].as_u64(), Some(*seq), "a duplicate must be the same message: {v}");
        assert_eq!(
            m.topic,
            format!("attrd/{}/results/{}", m.topic.split('/').nth(1).unwrap(), v["sku"].as_str().unwrap())
        );
        let at = v["published_at"].as_str().unwrap_or_else(|| panic!("no published_at: {v}"));
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).unwrap();
        seen.insert(id);
    }
    seen
}

async fn enqueue_results(
    outbox: &Outbox,
    topics: &Topics,
    range: std::ops::Range<u32>,
    pause: Duration,
) -> HashMap<String, u64> {
    let mut sent = HashMap::new();
    for i in range {
        let sku = format!("SKU-{i:04}");
        let payload = json!({"sku": sku, "attributes": {"articleType": {"value": "Tshirts", "confidence": 0.9}}});
        let e = outbox.enqueue(topics.result(&sku).unwrap(), payload, 1, false).await.unwrap();
        sent.insert(e.message_id.to_string(), e.seq);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_survive_a_broker_restart_mid_stream() {
    let mut broker = Mosquitto::start_persistent();
    let node = "edge-restart";
    let sub = Sub::start(broker.port, "it-restart-sub", &[&format!("attrd/{node}/results/#")], true).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(&dir);
    let (publisher, _cmds) = Publisher::start(&mqtt_cfg(broker.port, node), outbox.clone()).unwrap();
    let st = publisher.state();
    let topics = publisher.topics().clone();

    let producer = tokio::spawn({
        let (outbox, topics) = (outbox.clone(), topics.clone());
        async move { enqueue_results(&outbox, &topics, 0..200, Duration::from_millis(5)).await }
    });
    sub.wait_for("the first results", 10, |m| m.len() >= 40).await;
    assert!(!producer.is_finished(), "the broker must go down while results are still being produced");
    broker.stop();
    wait_state(&st, "the publisher to notice the broker is gone", 5, |s| s.connection != Connection::Connected).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // several failed reconnects while results keep coming
    assert!(st.borrow().connection_errors >= 2, "{:?}", *st.borrow());
    assert!(outbox.depth().messages > 0, "results wait in the outbox while the broker is down");
    broker.restart();

    let sent = producer.await.unwrap();
    assert_eq!(sent.len(), 200);
    let want: HashSet<String> = sent.keys().cloned().collect();
    let got = sub
        .wait_for("all 200 message ids", 15, |m| {
            let ids: HashSet<String> =
                m.iter().filter_map(|m| m.json()["message_id"].as_str().map(str::to_owned)).collect();
            want.is_subset(&ids)
        })
        .await;
    assert_eq!(check_results(&got, &sent), want);
    wait_drained(&outbox, 10).await;
    let s = st.borrow().clone();
    assert!(s.reconnects >= 1, "{s:?}");
    assert!(s.acked >= 200 && s.published >= s.acked, "{s:?}");
    assert_eq!(s.connection, Connection::Connected);
    publisher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_then_everything_drains() {
    // The subscriber's persistent session is made first, so it gets every result once the broker is back.
    let mut broker = Mosquitto::start_persistent();
    let node = "edge-boot";
    let sub = Sub::start(broker.port, "it-boot-sub", &[&format!("attrd/{node}/results/#")], true).await;
    broker.stop();

    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(&dir);
    let (publisher, _cmds) = Publisher::start(&mqtt_cfg(broker.port, node), outbox.clone()).unwrap();
    let st = publisher.state();
    let sent = enqueue_results(&outbox, publisher.topics(), 0..30, Duration::ZERO).await;
    wait_state(&st, "repeated connection attempts", 5, |s| s.connection_errors >= 3).await;
    let s = st.borrow().clone();
    assert_ne!(s.connection, Connection::Connected);
    assert!(s.last_error.is_some(), "{s:?}");
    assert_eq!(s.published, 0);
    assert_eq!(outbox.depth().messages, 30);

    broker.restart();
    let want: HashSet<String> = sent.keys().cloned().collect();
    let got = sub
        .wait_for("all 30 results", 10, |m| {
            let ids: HashSet<String> =
                m.iter().filter_map(|m| m.json()["message_id"].as_str().map(str::to_owned)).collect();
            want.is_subset(&ids)
        })
        .await;
    assert_eq!(check_results(&got, &sent), want);
    // Replayed oldest first.
    let seqs: Vec<u64> = got.iter().map(|m| m.json()["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "out of order: {seqs:?}");
    wait_drained(&outbox, 5).await;
    let s = st.borrow().clone();
    assert_eq!((s.connection, s.reconnects, s.acked), (Connection::Connected, 0, 30), "{s:?}");
    publisher.shutdown().await;
}

/// Rows a damaged disk or a hand edit could leave: each is skipped (and left in place) on its own, and a stretch of
/// them longer than a read is not taken for the end of the outbox. Before, the first row whose text was not UTF-8
/// failed every read from there on, and a short read after skipped rows stalled the replay until something new was
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_outbox_rows_are_skipped_and_every_result_after_them_is_published() {
    let broker = Mosquitto::start_persistent();
    let node = "edge-damaged";
    let sub = Sub::start(broker.port, "it-damaged-sub", &[&format!("attrd/{node}/results/#")], true).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(&dir);
    let topics = Topics::new("attrd", node).unwrap();
    let sent = enqueue_results(&outbox, &topics, 0..200, Duration::ZERO).await;
    // 80 damaged rows in a row, more than one read of the publisher's (2 x max_in_flight of 16), then good ones.
    let conn = rusqlite::Connection::open(dir.path().join("outbox.sqlite3")).unwrap();
    let damages = [
        "UPDATE outbox SET payload = CAST(X'7B22736B75223A22FF227D' AS TEXT) WHERE id = ?1", // invalid UTF-8
        "UPDATE outbox SET topic = CAST(X'617474FF72642F' AS TEXT) WHERE id = ?1",
        "UPDATE outbox SET payload = X'00010203' WHERE id = ?1", // a blob, not text
        "UPDATE outbox SET payload = '{\"sku\": ' WHERE id = ?1", // cut JSON
        "UPDATE outbox SET message_id = 'not-a-uuid' WHERE id = ?1",
        "UPDATE outbox SET qos = 'one' WHERE id = ?1",
    ];
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM outbox ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let damaged: Vec<i64> = ids[50..130].to_vec();
    // Their ids before the damage (one kind of damage is to the id itself).
    let bad_ids: HashSet<String> = conn
        .prepare("SELECT message_id FROM outbox WHERE id >= ?1 AND id <= ?2")
        .unwrap()
        .query_map([damaged[0], damaged[damaged.len() - 1]], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(bad_ids.len(), 80);
    for (i, id) in damaged.iter().enumerate() {
        conn.execute(damages[i % damages.len()], [id]).unwrap();
    }
    drop(conn);

    // Nothing is enqueued after this: the replay itself must get past the damaged stretch.
    let (publisher, _cmds) = Publisher::start(&mqtt_cfg(broker.port, node), outbox.clone()).unwrap();
    let want: HashSet<String> = sent.keys().filter(|id| !bad_ids.contains(*id)).cloned().collect();
    assert_eq!(want.len(), 120);
    let got = sub
        .wait_for("the 120 undamaged results", 15, |m| {
            let ids: HashSet<String> =
                m.iter().filter_map(|m| m.json()["message_id"].as_str().map(str::to_owned)).collect();
            want.is_subset(&ids)
        })
        .await;
    assert_eq!(check_results(&got, &sent), want, "only the undamaged results, each as stored");
    // The damaged rows stay for an operator to look at; everything else was acknowledged and deleted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while outbox.depth().messages > 80 {
        assert!(tokio::time::Instant::now() < deadline, "not drained down to the damaged rows: {:?}", outbox.depth());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(outbox.depth().messages, 80);
    let left = outbox.read_batch(None, 1000).await.unwrap();
    assert_eq!((left.rows, left.entries.len(), left.last_id), (80, 0, damaged.last().copied()));
    publisher.shutdown().await;
}

/// A "broker" that accepts the connection and every publish but never acknowledges anything, then hangs up.
async fn black_hole_broker(port: u16, hold: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let (mut sock, _) = listener.accept().await.unwrap();
    drop(listener);
    let mut buf = vec![0u8; 64 * 1024];
    let n = sock.read(&mut buf).await.unwrap();
    assert!(n > 0 && buf[0] == 0x10, "expected CONNECT, got {:x?}", &buf[..n.min(8)]);
    sock.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap(); // CONNACK, accepted
    let _ = tokio::time::timeout(hold, async { while sock.read(&mut buf).await.is_ok_and(|n| n > 0) {} }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_publishes_stay_in_the_outbox_and_are_replayed() {
    let mut broker = Mosquitto::start_persistent();
    let node = "edge-noack";
    let sub = Sub::start(broker.port, "it-noack-sub", &[&format!("attrd/{node}/results/#")], true).await;
    broker.stop();
    let black_hole = tokio::spawn(black_hole_broker(broker.port, Duration::from_millis(1500)));

    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(&dir);
    let (publisher, _cmds) = Publisher::start(&mqtt_cfg(broker.port, node), outbox.clone()).unwrap();
    let st = publisher.state();
    let sent = enqueue_results(&outbox, publisher.topics(), 0..40, Duration::ZERO).await;
    wait_state(&st, "a full in-flight window", 5, |s| s.published == 16).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = st.borrow().clone();
    assert_eq!((s.published, s.acked, s.in_flight), (16, 0, 16), "the window bounds unacknowledged publishes: {s:?}");
    assert_eq!(outbox.depth().messages, 40, "nothing leaves the outbox without a PUBACK");

    black_hole.await.unwrap();
    broker.restart();
    let want: HashSet<String> = sent.keys().cloned().collect();
    let got = sub
        .wait_for("all 40 results", 10, |m| {
            let ids: HashSet<String> =
                m.iter().filter_map(|m| m.json()["message_id"].as_str().map(str::to_owned)).collect();
            want.is_subset(&ids)
        })
        .await;
    assert_eq!(check_results(&got, &sent), want);
    wait_drained(&outbox, 5).await;
    let s = st.borrow().clone();
    assert_eq!((s.acked, s.reconnects), (40, 1), "{s:?}");
    assert_eq!(s.published, 56, "the 16 unacknowledged ones were sent again: {s:?}");
    publisher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_offline_on_abort_and_stopped_on_graceful_shutdown() {
    let broker = Mosquitto::start();
    let node = "edge-will";
    let available = format!("attrd/{node}/available");
    let sub = Sub::start(broker.port, "it-will-sub", &[&available], false).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(&dir);
    let last = |s: &Sub| s.on(&available).last().cloned().unwrap_or_default();

    let (publisher, _cmds) = Publisher::start(&mqtt_cfg(broker.port, node), outbox.clone()).unwrap();
    sub.wait_for("online", 5, |_| last(&sub) == "online").await;
    publisher.abort(); // the connection drops without DISCONNECT, as in a crash
    sub.wait_for("the last will", 5, |_| last(&sub) == "offline").await;

    let (publisher, _cmds) = Publisher::start(&mqtt_cfg(broker.port, node), outbox.clone()).unwrap();
    let st = publisher.state();
    sub.wait_for("online again", 5, |_| last(&sub) == "online").await;
    publisher.shutdown().await;
    assert_eq!(st.borrow().connection, Connection::Stopped);
    sub.wait_for("stopped", 5, |_| last(&sub) == "stopped").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sub.on(&available), ["online", "offline", "online", "stopped"], "no will after a clean disconnect");

    // Retained, so a dashboard that connects later sees it too.
    let late = Sub::start(broker.port, "it-will-late", &[&available], false).await;
    let m = late.wait_for("retained availability", 5, |m| !m.is_empty()).await;
    assert_eq!((m[0].text().as_str(), m[0].retain), ("stopped", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_is_restored_after_the_broker_lost_it() {
    let mut broker = Mosquitto::start(); // in-memory: a restart forgets retained messages
    let node = "edge-retained";
    let dir = tempfile::tempdir().unwrap();
    let (publisher, _cmds) = Publisher::start(&mqtt_cfg(broker.port, node), outbox_in(&dir)).unwrap();
    let st = publisher.state();
    let topics = publisher.topics().clone();
    let handle = publisher.handle();
    handle.publish_retained(topics.status(), &json!({"state": "ready", "v": 1})).unwrap();
    handle.publish_retained(topics.status(), &json!({"state": "ready", "v": 2})).unwrap();
    assert!(handle.publish_retained("attrd/+/status".into(), &json!({})).is_err());

    let first = Sub::start(broker.port, "it-retained-1", &[&topics.status()], false).await;
    first.wait_for("status v2", 5, |m| m.iter().any(|m| m.json()["v"] == 2)).await;
    drop(first);

    broker.restart();
    wait_state(&st, "the reconnect", 10, |s| s.reconnects >= 1 && s.connection == Connection::Connected).await;
    let second = Sub::start(broker.port, "it-retained-2", &[&topics.status()], false).await;
    let m = second.wait_for("status restored by attrd", 5, |m| !m.is_empty()).await;
    assert_eq!(m[0].json(), json!({"state": "ready", "v": 2}));
    assert!(m[0].retain);
    publisher.shutdown().await;
}

async fn recv_command(cmds: &mut tokio::sync::mpsc::Receiver<IncomingCommand>) -> IncomingCommand {
    tokio::time::timeout(Duration::from_secs(5), cmds.recv()).await.expect("a command within 5 s").unwrap()
}

fn mosquitto_pub(port: u16, args: &[&str]) {
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(args)
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_delivered_malformed_ones_answered_retained_ones_ignored() {
    let broker = Mosquitto::start();
    let node = "edge-cmd";
    let base = format!("attrd/{node}");
    // Left on the broker before attrd starts: delivered with the retain flag right after the subscription.
    mosquitto_pub(broker.port, &["-r", "-t", &format!("{base}/cmd/reload"), "-m", r#"{"retained":true}"#]);
    let sub =
        Sub::start(broker.port, "it-cmd-sub", &[&format!("{base}/cmd/+/response"), &format!("{base}/errors")], false)
            .await;

    let dir = tempfile::tempdir().unwrap();
    let (publisher, mut cmds) = Publisher::start(&mqtt_cfg(broker.port, node), outbox_in(&dir)).unwrap();
    let st = publisher.state();
    wait_state(&st, "connected", 5, |s| s.connection == Connection::Connected).await;
    wait_state(&st, "the retained command to be refused", 5, |s| s.commands_rejected >= 1).await;

    // Malformed JSON: an error reply on the kind's response topic.
    mosquitto_pub(broker.port, &["-t", &format!("{base}/cmd/reload"), "-m", "{not json"]);
    let m = sub.wait_for("the malformed-payload reply", 5, |m| !m.is_empty()).await;
    assert_eq!(m[0].topic, format!("{base}/cmd/reload/response"));
    let v = m[0].json();
    assert_eq!((v["ok"].clone(), v["kind"].clone()), (json!(false), json!("reload")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("malformed JSON"), "{v}");

    // Topics that name no valid command: replies on the node's error topic.
    mosquitto_pub(broker.port, &["-t", &format!("{base}/cmd/bad kind!"), "-m", "{}"]);
    mosquitto_pub(broker.port, &["-t", &format!("{base}/cmd/a/b/c"), "-m", "{}"]);
    let m = sub
        .wait_for("two error-topic replies", 5, |m| m.iter().filter(|m| m.topic.ends_with("/errors")).count() == 2)
        .await;
    let errs: Vec<Value> = m.iter().filter(|m| m.topic.ends_with("/errors")).map(Msg::json).collect();
    assert_eq!(errs[0]["topic"], format!("{base}/cmd/bad kind!"), "{errs:?}");
    assert!(errs.iter().all(|e| e["ok"] == json!(false)), "{errs:?}");

    // Valid commands reach the daemon, an empty payload as null.
    mosquitto_pub(broker.port, &["-t", &format!("{base}/cmd/status"), "-m", r#"{"id":7}"#]);
    mosquitto_pub(broker.port, &["-t", &format!("{base}/cmd/ping"), "-n"]);
    let cmd = recv_command(&mut cmds).await;
    assert_eq!((cmd.kind.as_str(), cmd.payload.clone()), ("status", json!({"id": 7})));
    assert_eq!(cmd.response_topic, format!("{base}/cmd/status/response"));
    let ping = recv_command(&mut cmds).await;
    assert_eq!((ping.kind.as_str(), ping.payload), ("ping", Value::Null));
    assert!(cmds.try_recv().is_err(), "the retained command must never be executed");

    publisher.handle().respond(cmd.response_topic.clone(), &json!({"ok": true, "id": 7})).unwrap();
    sub.wait_for("our reply", 5, |m| m.iter().any(|m| m.topic == cmd.response_topic)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Exactly one reply per message: our own replies, echoed back through `cmd/#`, are not answered again.
    assert_eq!(sub.messages().len(), 4, "{:#?}", sub.messages());
    assert_eq!(sub.on(&format!("{base}/cmd/reload/response")).len(), 1, "no reply to the retained command");
    let s = st.borrow().clone();
    assert_eq!((s.commands, s.commands_rejected), (2, 4), "{s:?}");
    publisher.shutdown().await;
}

#[test]
fn topic_builder_rejects_bad_skus() {
    let t = Topics::new("attrd", "edge-1").unwrap();
    assert_eq!(t.result("SKU 42-a").unwrap(), "attrd/edge-1/results/SKU 42-a");
    for sku in ["a/b", "a+", "#", "", "nul\0", "$x", &"s".repeat(129)] {
        let e = t.result(sku).unwrap_err();
        assert!(e.to_string().contains("SKU"), "{e}");
    }
    assert!(matches!(t.result("x/y"), Err(TopicError::Forbidden { ch: '/', .. })));
}

#[test]
fn config_is_validated_before_anything_connects() {
    let ok = mqtt_cfg(free_port(), "n");
    ok.validate().unwrap();
    assert_eq!(ok.client_id(), "attrd-n");
    for bad in [
        MqttConfig { keep_alive: Duration::from_millis(500), ..ok.clone() },
        MqttConfig { keep_alive: Duration::ZERO, ..ok.clone() },
        MqttConfig { node: Some("models".into()), ..ok.clone() },
        MqttConfig { max_in_flight: 0, ..ok.clone() },
        MqttConfig { node: Some("a/b".into()), ..ok.clone() },
        MqttConfig { password: Some("p".into()), ..ok.clone() },
        MqttConfig { reconnect_min: Duration::from_secs(60), ..ok.clone() },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    let parsed: Result<MqttConfig, _> = serde_json::from_value(json!({"host": "b", "hots": "typo"}));
    assert!(parsed.is_err(), "unknown fields are refused");
    let parsed: MqttConfig =
        serde_json::from_value(json!({"port": 8883, "keep_alive": "10s", "tls": {"ca_file": "/nonexistent/ca.pem"}}))
            .unwrap();
    assert_eq!(parsed.keep_alive, Duration::from_secs(10));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = rt.block_on(async { Publisher::start(&parsed, outbox_in(&dir)).map(|_| ()) }).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

// A throw-away test PKI (P-256, valid until 2126), made with openssl for these tests only.
const TEST_CA: &str = r"-----BEGIN CERTIFICATE-----
MIIBljCCAT2gAwIBAgIUfXKY0oxMQB5IpIMq41ifh0/l8+wwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNYXR0cmQgdGVzdCBDQTAgFw0yNjExMjcwNDU3MTdaGA8yMTI2
MTEwMzA0NTcxN1owGDEWMBQGA1UEAwwNYXR0cmQgdGVzdCBDQTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABJYtveaVjFNTIByVBiwD+c+AxalBfHg+5LFKs2au21UD
B1kF1oSg5MBa+cUqookDkP+sDCmtgjCIEULca3UEBkGjYzBhMB0GA1UdDgQWBBQ+
hg0TLeR3bO5uBHOtq3tS49Ot4TAfBgNVHSMEGDAWgBQ+hg0TLeR3bO5uBHOtq3tS
49Ot4TAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAKBggqhkjOPQQD
AgNHADBEAiAtl/Jl9eB3AyKBg53IYIbk9BTKTjLhGpqkUrEze9QjyQIgIQO/NplH
OMi1OfBWJvdQP5ES+bj6uA9TJxgPm6bxVkI=
-----END CERTIFICATE-----
";
const SERVER_CERT: &str = r"-----BEGIN CERTIFICATE-----
MIIBwDCCAWagAwIBAgIURW81bP7NaqHHC++hte/u2hELui8wCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNYXR0cmQgdGVzdCBDQTAgFw0yNjExMjcwNDU3MTdaGA8yMTI2
MTEwMzA0NTcxN1owFDESMBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAE3q/TEoX2a6SX1Ni4zXQoZZPoJJ757l20dhTBQ1F94p+yZZ3H
5oSU2n57XiXDcedG6rNhvP2ebFgxSENNvpcawKOBjzCBjDAaBgNVHREEEzARhwR/
AAABgglsb2NhbGhvc3QwCQYDVR0TBAIwADAOBgNVHQ8BAf8EBAMCB4AwEwYDVR0l
BAwwCgYIKwYBBQUHAwEwHQYDVR0OBBYEFH/7bIZGPp6DCfUi5ny0t82vkTaYMB8G
A1UdIwQYMBaAFD6GDRMt5Hds7m4Ec62re1Lj063hMAoGCCqGSM49BAMCA0gAMEUC
IEfmUTzYnDN5AAejEFTlE0iL0nTfwZjYTis+Osiq02jNAiEAwMmSvv+dD8fSrLEO
IYZRKWT8pu1GYFtoaEF5ILgwnzk=
-----END CERTIFICATE-----
";
const SERVER_KEY: &str = r"-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQglWnrGv1aPpOoPRZ3
GFdnrkQ7IlFUU24R5nIzhyO2iUmhRANCAATer9MShfZrpJfU2LjNdChlk+gknvnu
XbR2FMFDUX3in7JlncfmhJTafnteJcNx50bqs2G8/Z5sWDFIQ02+lxrA
-----END PRIVATE KEY-----
";
const CLIENT_CERT: &str = r"-----BEGIN CERTIFICATE-----
MIIBpTCCAUugAwIBAgIURW81bP7NaqHHC++hte/u2hELujAwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNYXR0cmQgdGVzdCBDQTAgFw0yNjExMjcwNDU3MTdaGA8yMTI2
MTEwMzA0NTcxN1owFzEVMBMGA1UEAwwMYXR0cmQtY2xpZW50MFkwEwYHKoZIzj0C
AQYIKoZIzj0DAQcDQgAEtyahHMXZuJbOctAdJ4h5Wk+Vtklj/uUjhDaKhh/tStTt
ElqE4ChOhjv6DOg8DO0DJ0oOd0D3wDBrOiTwh+nxwqNyMHAwCQYDVR0TBAIwADAO
BgNVHQ8BAf8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwIwHQYDVR0OBBYEFCTA
sl7Ucc6CUMbEZVxhwL2P/fCvMB8GA1UdIwQYMBaAFD6GDRMt5Hds7m4Ec62re1Lj
063hMAoGCCqGSM49BAMCA0gAMEUCIQChzvmLfKqnC4IyydqOsFBJ2QJvOJ9Xs6en
fY8UQiPXWgIgLZNX4rB/Gl99xpbPc3D4sabKI9th3AgJTCD+F1DZJ0M=
-----END CERTIFICATE-----
";
const CLIENT_KEY: &str = r"-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgmLTuNi5cDZwWA0Xj
Hqc9qE4Po+bMxJj008Y3bCY/ftqhRANCAAS3JqEcxdm4ls5y0B0niHlaT5W2SWP+
5SOENoqGH+1K1O0SWoTgKE6GO/oM6DwM7QMnSg53QPfAMGs6JPCH6fHC
-----END PRIVATE KEY-----
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_mutual_tls_and_refuses_an_unknown_server() {
    let pki = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = pki.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (ca, server_cert, server_key) =
        (file("ca.pem", TEST_CA), file("server.pem", SERVER_CERT), file("server.key", SERVER_KEY));
    let (client_cert, client_key) = (file("client.pem", CLIENT_CERT), file("client.key", CLIENT_KEY));
    let broker = Mosquitto::start_with_listener(
        free_port(),
        false,
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true",
            ca.display(),
            server_cert.display(),
            server_key.display()
        ),
    );
    let tls = MqttTlsConfig { ca_file: ca, client_cert_file: Some(client_cert), client_key_file: Some(client_key) };

    let node = "edge-tls";
    let mut o = Sub::options(broker.port, "it-tls-sub", false);
    let sub_tls = attrd::mqtt::tls_client_config(&tls).unwrap();
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(sub_tls))));
    let sub = Sub::start_with(o, &[&format!("attrd/{node}/results/#")]).await;

    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(&dir);
    let cfg = MqttConfig { tls: Some(tls.clone()), ..mqtt_cfg(broker.port, node) };
    let (publisher, _cmds) = Publisher::start(&cfg, outbox.clone()).unwrap();
    let sent = enqueue_results(&outbox, publisher.topics(), 0..5, Duration::ZERO).await;
    let got = sub.wait_for("5 results over TLS", 10, |m| m.len() >= 5).await;
    assert_eq!(check_results(&got, &sent).len(), 5);
    wait_drained(&outbox, 5).await;
    publisher.shutdown().await;

    // Trusting the wrong CA (here: the server's own leaf certificate) must fail the handshake, not connect.
    let wrong = MqttTlsConfig { ca_file: pki.path().join("server.pem"), ..tls };
    let cfg = MqttConfig { tls: Some(wrong), node: Some("edge-tls-wrong".into()), ..cfg };
    let (publisher, _cmds) = Publisher::start(&cfg, outbox.clone()).unwrap();
    let st = publisher.state();
    wait_state(&st, "failed TLS handshakes", 5, |s| s.connection_errors >= 2).await;
    let s = st.borrow().clone();
    assert_eq!(s.reconnects, 0);
    assert!(s.last_error.as_deref().unwrap_or_default().to_lowercase().contains("certificate"), "{s:?}");
}

/// `config/mosquitto-acl.conf` on a real mosquitto with password logins: a node publishes its own results but
/// cannot forge another node's or publish a model bundle, and only receives its own commands; the integrator sees
/// results and reaches nodes with commands; the shipper may publish bundles.
#[test]
fn the_example_acl_confines_each_node_to_its_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    for (i, user) in ["edge-1", "edge-2", "integrator", "shipper"].iter().enumerate() {
        let mut cmd = std::process::Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let st = cmd.arg("-b").arg(&passwd).arg(user).arg(format!("pw-{user}")).status().unwrap();
        assert!(st.success(), "mosquitto_passwd {user}");
    }
    let acl = crate::common::repo().join("config/mosquitto-acl.conf");
    let port = free_port();
    let _broker = Mosquitto::start_with_listener(
        port,
        false,
        &format!("password_file {}\nacl_file {}", passwd.display(), acl.display()),
    );
    let sub = |user: &str, topic: &str| {
        std::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", user, "-P", &format!("pw-{user}")])
            .args(["-i", &format!("acl-sub-{user}"), "-t", topic, "-v", "-W", "4"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let publish = |user: &str, topic: &str, msg: &str| {
        let st = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", user, "-P", &format!("pw-{user}")])
            .args(["-q", "1", "-t", topic, "-m", msg])
            .status()
            .unwrap();
        assert!(st.success(), "{user} could not connect to publish on {topic}");
    };
    let everything = sub("shipper", "attrd/#"); // the shipper reads only attrd/models/#
    let integrator = sub("integrator", "attrd/+/results/#");
    let edge1_cmds = sub("edge-1", "attrd/+/cmd/#"); // wider than allowed: only its own arrive
    std::thread::sleep(std::time::Duration::from_millis(800));
    publish("edge-1", "attrd/edge-1/results/SKU1", "genuine");
    publish("edge-1", "attrd/edge-2/results/SKU2", "forged-result");
    publish("edge-1", "attrd/models/fashion", "forged-bundle");
    publish("integrator", "attrd/edge-1/cmd/capture", "for-edge-1");
    publish("integrator", "attrd/edge-2/cmd/capture", "for-edge-2");
    publish("shipper", "attrd/models/fashion", "real-bundle");
    let out = |c: std::process::Child| String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap();
    let (integrator, edge1_cmds, everything) = (out(integrator), out(edge1_cmds), out(everything));
    assert!(integrator.contains("attrd/edge-1/results/SKU1 genuine"), "{integrator}");
    assert!(!integrator.contains("forged"), "a node forged another node's result:\n{integrator}");
    assert!(edge1_cmds.contains("attrd/edge-1/cmd/capture for-edge-1"), "{edge1_cmds}");
    assert!(!edge1_cmds.contains("for-edge-2"), "edge-1 read edge-2's commands:\n{edge1_cmds}");
    assert!(everything.contains("attrd/models/fashion real-bundle"), "{everything}");
    assert!(!everything.contains("forged-bundle"), "a node published a bundle:\n{everything}");
    assert!(!everything.contains("results"), "the shipper read results:\n{everything}");
}

/// Subscribing to the fleet's model announcements brings every retained one in a single burst: all of them reach
/// the receiver, even when it starts reading only after the burst (it may be busy with an install). Before, the
/// queue held 64 messages and dropped the rest, and a dropped announcement was not seen again until a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_retained_model_announcement_reaches_a_receiver_that_reads_late() {
    let broker = Mosquitto::start();
    let n = 300;
    let (client, mut events) = AsyncClient::new(MqttOptions::new("it-fleet-shipper", "127.0.0.1", broker.port), 64);
    let shipper = tokio::spawn(async move {
        for i in 0..n {
            let topic = format!("attrd/models/m{i:03}");
            client.publish(topic, QoS::AtLeastOnce, true, vec![b'a'; 4096]).await.unwrap();
        }
    });
    let mut acked = 0;
    while acked < n {
        if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
            acked += 1;
        }
    }
    shipper.await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (mut publisher, _cmds) = Publisher::start(&mqtt_cfg(broker.port, "edge-fleet"), outbox_in(&dir)).unwrap();
    let mut models = publisher.take_model_messages().unwrap();
    publisher.handle().subscribe(publisher.topics().models_filter(None).unwrap()).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut names = HashSet::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), models.recv()).await {
        assert!(m.retain && m.payload.len() == 4096, "{:?}", m.topic);
        names.insert(format!("{:?}", m.topic));
    }
    assert_eq!(names.len(), n, "announcements received");
    publisher.shutdown().await;
}
