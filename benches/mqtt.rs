//! P6 of the benchmarks: QoS 1 results per second through the durable outbox to a local mosquitto, with a
//! subscriber that must see every result (0 lost). `scripts/bench-mqtt` runs it; on its own:
//!
//!   cargo bench --bench mqtt -- [--messages N] [--group G] [--in-flight W] [--rounds R]
//!
//! Each round measures three sides on the same broker, payloads and subscriber:
//! - `outbox`: results enqueued in groups of G (`Outbox::enqueue_many`, as the daemon's outbox writer stores what
//!   the pipeline has finished), published by `mqtt::Publisher`, deleted on PUBACK. Timed from the first enqueue
//!   until the subscriber has every `message_id` and the outbox is empty.
//! - `outbox-single`: the same, with one enqueue awaited after the other (one transaction and fsync per result).
//! - `rumqttc`: the peer: the same client library publishing the same payloads at QoS 1 with the same in-flight
//!   window, straight from memory (no durability), timed until every PUBACK and every delivery arrived.
//!
//! Prints one JSON line per side and round. Exits non-zero if any result is lost or duplicated under two ids.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use attrd::mqtt::{Connection, MqttConfig, Publisher};
use attrd::outbox::{CoveredFile, FileVersion, NewMessage, Outbox, OutboxConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::watch;

/// Longest any side may take before the bench calls it a failure.
const DEADLINE: Duration = Duration::from_secs(300);

struct Args {
    messages: usize,
    group: usize,
    in_flight: u16,
    rounds: usize,
    /// Hot-folder files each result records as covered (1: as from a hot folder; 0: as from a camera).
    covers: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args { messages: 20_000, group: 64, in_flight: 64, rounds: 2, covers: 1 };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--messages" => a.messages = val()?.parse()?,
            "--group" => a.group = val()?.parse()?,
            "--in-flight" => a.in_flight = val()?.parse()?,
            "--rounds" => a.rounds = val()?.parse()?,
            "--covers" => a.covers = val()?.parse()?,
            other => bail!(
                "unknown argument {other}; usage: cargo bench --bench mqtt -- [--messages N] [--group G] [--in-flight W] \
                 [--rounds R] [--covers C]"
            ),
        }
    }
    ensure!(a.messages > 0 && a.group > 0 && a.in_flight > 0 && a.rounds > 0, "all values must be positive");
    Ok(a)
}

/// A private mosquitto on a free port; queues and in-flight windows unlimited so the broker never drops for the
/// subscriber (the default `max_queued_messages` of 1000 would).
struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                 persistence false\n"
            ),
        )?;
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting /usr/sbin/mosquitto (Debian package mosquitto)")?;
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < until, "mosquitto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, port, _dir: dir })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A result as attrd publishes it (six attributes with top-3, as the default model gives), about 1.6 KB.
fn payload(i: usize) -> serde_json::Value {
    let attr = |value: &str, p: f64, others: [(&str, f64); 2]| {
        json!({"value": value, "confidence": p, "accepted": p >= 0.5,
               "topk": [{"value": value, "p": p}, {"value": others[0].0, "p": others[0].1},
                        {"value": others[1].0, "p": others[1].1}]})
    };
    json!({
        "schema_version": 1, "node": "p6", "sku": format!("SKU{i:07}"),
        "captured_at": "2026-12-03T12:00:00.000Z", "finished_at": "2026-12-03T12:00:00.031Z",
        "source": {"kind": "hotfolder", "name": "studio", "image": format!("SKU{i:07}_front.jpg"),
                   "image_sha256": format!("{:064x}", i), "width": 1080, "height": 1440},
        "model": {"name": "fashion-attributes", "version": "1.0.0", "precision": "int8",
                  "execution_provider": "cpu", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
        "attributes": {
            "gender": attr("Men", 0.93, [("Women", 0.05), ("Unisex", 0.01)]),
            "articleType": attr("Tshirts", 0.88, [("Shirts", 0.06), ("Tops", 0.03)]),
            "baseColour": attr("Navy Blue", 0.61, [("Blue", 0.22), ("Black", 0.09)]),
            "season": attr("Summer", 0.55, [("Fall", 0.30), ("Winter", 0.10)]),
            "usage": attr("Casual", 0.95, [("Sports", 0.03), ("Formal", 0.01)]),
            "pattern": attr("Solid", 0.81, [("Striped", 0.11), ("Printed", 0.05)]),
        },
        "latency_ms": {"decode": 4.1, "preprocess": 0.6, "queue": 1.2, "infer": 2.3, "total": 8.9},
    })
}

fn message_id(i: usize) -> uuid::Uuid {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("p6-{i}").as_bytes())
}

/// Subscribes to every result and reports, through a watch, how many distinct `message_id`s arrived.
struct Subscriber {
    seen: watch::Receiver<(usize, usize)>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(port: u16, id: &str) -> anyhow::Result<Self> {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(true).set_inflight(1000).set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 10_000);
        client.subscribe("attrd/p6/results/#", QoS::AtLeastOnce).await?;
        let (tx, seen) = watch::channel((0, 0));
        let (subscribed_tx, mut subscribed) = watch::channel(false);
        let task = tokio::spawn(async move {
            let _client = client;
            let mut ids = HashSet::new();
            let mut total = 0usize;
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                        if let Some(id) = v["message_id"].as_str() {
                            ids.insert(id.to_string());
                        }
                        total += 1;
                        let _ = tx.send((ids.len(), total));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("subscriber: {e}");
                        return;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|s| *s))
            .await
            .context("no SUBACK")?
            .context("subscriber ended")?;
        Ok(Self { seen, task })
    }

    async fn wait_for(&mut self, n: usize) -> anyhow::Result<(usize, usize)> {
        let waited =
            tokio::time::timeout(DEADLINE, self.seen.wait_for(|(ids, _)| *ids >= n)).await.map(|r| r.map(|g| *g));
        match waited {
            Ok(Ok(got)) => Ok(got),
            Ok(Err(_)) => bail!("subscriber ended"),
            Err(_) => bail!("only {:?} (distinct, total) of {n} results arrived", *self.seen.borrow()),
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn report(side: &str, args: &Args, round: usize, took: Duration, received: (usize, usize), extra: serde_json::Value) {
    let mut line = json!({
        "impl": side, "round": round, "messages": args.messages, "in_flight": args.in_flight,
        "seconds": took.as_secs_f64(), "per_s": args.messages as f64 / took.as_secs_f64(), "covers": args.covers,
        "distinct_received": received.0, "duplicates": received.1 - received.0,
        "lost": args.messages - received.0.min(args.messages),
        "payload_bytes": payload(0).to_string().len(),
    });
    if let (Some(l), Some(e)) = (line.as_object_mut(), extra.as_object()) {
        l.extend(e.clone());
    }
    println!("{line}");
}

async fn run_outbox(args: &Args, broker: &Broker, round: usize, group: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let outbox = Outbox::open(&OutboxConfig { path: dir.path().join("outbox.sqlite3"), ..OutboxConfig::default() })?;
    let mut sub = Subscriber::start(broker.port, &format!("p6-sub-o{round}-{group}")).await?;
    let cfg = MqttConfig {
        host: "127.0.0.1".into(),
        port: broker.port,
        node: Some("p6".into()),
        max_in_flight: args.in_flight,
        ..MqttConfig::default()
    };
    let (publisher, _commands) = Publisher::start(&cfg, outbox.clone())?;
    let mut state = publisher.state();
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| s.connection == Connection::Connected))
        .await
        .context("publisher did not connect")??;
    let topics = cfg.topics()?;
    // Payloads are built before the clock starts: the daemon has them from the pipeline.
    let msgs: Vec<NewMessage> = (0..args.messages)
        .map(|i| {
            Ok(NewMessage {
                topic: topics.result(&format!("SKU{i:07}"))?,
                payload: payload(i),
                qos: 1,
                retain: false,
                message_id: message_id(i),
                // As from a hot folder: the result records the file it covers in the same transaction.
                covers: (0..args.covers)
                    .map(|k| CoveredFile {
                        path: format!("/var/lib/attrd/hotfolder/SKU{i:07}_{k}.jpg").into(),
                        version: FileVersion { dev: 2049, ino: (i * 8 + k) as u64, len: 350_000, mtime_ns: 1 << 60 },
                    })
                    .collect(),
                releases: Vec::new(),
            })
        })
        .collect::<anyhow::Result<_>>()?;

    let start = Instant::now();
    let mut it = msgs.into_iter().peekable();
    while it.peek().is_some() {
        let chunk: Vec<NewMessage> = it.by_ref().take(group).collect();
        for r in outbox.enqueue_many(chunk).await {
            r?;
        }
    }
    let enqueued = start.elapsed();
    let received = sub.wait_for(args.messages).await?;
    let until = Instant::now() + DEADLINE;
    while outbox.depth().messages > 0 {
        ensure!(Instant::now() < until, "outbox still holds {} results", outbox.depth().messages);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = start.elapsed();
    let side = if group == 1 { "outbox-single" } else { "outbox" };
    report(
        side,
        args,
        round,
        took,
        received,
        json!({"group": group, "enqueue_per_s": args.messages as f64 / enqueued.as_secs_f64()}),
    );
    publisher.shutdown().await;
    ensure!(received.0 == args.messages, "{side}: {} of {} results arrived", received.0, args.messages);
    Ok(())
}

async fn run_raw(args: &Args, broker: &Broker, round: usize) -> anyhow::Result<()> {
    let mut sub = Subscriber::start(broker.port, &format!("p6-sub-r{round}")).await?;
    let mut opts = MqttOptions::new(format!("p6-raw-{round}"), "127.0.0.1", broker.port);
    opts.set_clean_session(true).set_inflight(args.in_flight).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, usize::from(args.in_flight));
    let payloads: Vec<(String, Vec<u8>)> = (0..args.messages)
        .map(|i| {
            let mut p = payload(i);
            p["seq"] = json!(i + 1);
            p["message_id"] = json!(message_id(i).to_string());
            (format!("attrd/p6/results/SKU{i:07}"), p.to_string().into_bytes())
        })
        .collect();
    let n = args.messages;
    let acks = tokio::spawn(async move {
        let mut acked = 0usize;
        while acked < n {
            match el.poll().await? {
                Event::Incoming(Packet::PubAck(_)) => acked += 1,
                _ => continue,
            }
        }
        anyhow::Ok(el)
    });
    let start = Instant::now();
    for (topic, bytes) in payloads {
        client.publish(topic, QoS::AtLeastOnce, false, bytes).await?;
    }
    let el = tokio::time::timeout(DEADLINE, acks).await.context("PUBACKs did not all arrive")???;
    let received = sub.wait_for(args.messages).await?;
    let took = start.elapsed();
    report("rumqttc", args, round, took, received, json!({}));
    drop((client, el));
    ensure!(received.0 == args.messages, "rumqttc: {} of {} results arrived", received.0, args.messages);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let broker = Broker::start()?;
        for round in 1..=args.rounds {
            // The order alternates so neither side always meets a broker warmed by the other.
            if round % 2 == 1 {
                run_outbox(&args, &broker, round, args.group).await?;
                run_raw(&args, &broker, round).await?;
            } else {
                run_raw(&args, &broker, round).await?;
                run_outbox(&args, &broker, round, args.group).await?;
            }
        }
        run_outbox(&Args { messages: args.messages.min(2_000), ..args }, &broker, 1, 1).await
    })
}
