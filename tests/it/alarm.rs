//! A full disk under a running daemon: the outbox cannot store results, the daemon raises a clear alarm (log, metric,
//! MQTT status), keeps running and keeps every photo; when space returns it clears the alarm and publishes them all.
//!
//! "No space" is played with `RLIMIT_FSIZE` set on the running daemon (`prlimit`): every write at an offset past the
//! limit fails with `EFBIG`, as writes fail with `ENOSPC` on a full disk, and raising the limit again is space
//! returning. The daemon starts with `SIGXFSZ` ignored (`trap '' XFSZ`), as the signal's default action would kill it.

use crate::common::{Mosquitto, repo};
use crate::daemon::{Daemon, Node, wait_ready_within};
use crate::mqtt::Sub;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn prlimit_fsize(pid: u32, limit: &str) {
    let st = Command::new("prlimit").args(["--pid", &pid.to_string(), &format!("--fsize={limit}:unlimited")]).status();
    assert!(st.unwrap().success(), "prlimit failed");
}

fn metric(port: u16, series: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

fn result_skus(sub: &Sub, node: &str) -> std::collections::BTreeSet<String> {
    let prefix = format!("attrd/{node}/results/");
    sub.messages()
        .iter()
        .filter(|m| m.topic.starts_with(&prefix))
        .map(|m| m.json()["sku"].as_str().unwrap().into())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_raises_an_alarm_keeps_every_photo_and_recovers_when_space_returns() {
    let broker = Mosquitto::start();
    let node = Node::with_bundle("it-disk", broker.port, &repo().join("models/fashion-lite0-int8"));
    let sub = Sub::start(broker.port, "it-disk-sub", &["attrd/it-disk/results/#", "attrd/it-disk/status"], false).await;
    // The log goes through a pipe, which the file size limit does not touch.
    let mut child = Command::new("sh")
        .args(["-c", "trap '' XFSZ; exec \"$0\" run --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_attrd"))
        .arg(&node.config)
        .env("ATTRD_LOG", "info,ort=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let logged = |what: &str| log.lock().unwrap().contains(what);
    let log_text = || log.lock().unwrap().clone();
    let mut child = Daemon(child);
    wait_ready_within(&node, &mut child, 30).await;
    let port = node.http_port;
    let alarm_series = "attrd_alarm{alarm=\"outbox_unwritable\"}";
    assert_eq!(metric(port, alarm_series), Some(0.0));

    let before: Vec<String> = (0..3).map(|i| format!("DISKA{i}")).collect();
    node.drop_photos(&before);
    sub.wait_for("results before the disk fills", 60, |_| result_skus(&sub, "it-disk").len() == 3).await;

    // The disk is full.
    prlimit_fsize(child.id(), "1024");
    let during: Vec<String> = (0..4).map(|i| format!("DISKB{i}")).collect();
    node.drop_photos(&during);
    for _ in 0..600 {
        if logged("ALARM results cannot be stored in the outbox") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged("ALARM results cannot be stored in the outbox"), "no alarm:\n{}", log_text());
    assert_eq!(metric(port, alarm_series), Some(1.0), "{}", log_text());
    let status = sub
        .wait_for("the alarm in the retained status", 20, |m| {
            m.iter().any(|m| m.topic == "attrd/it-disk/status" && m.json()["alarms"][0]["alarm"] == "outbox_unwritable")
        })
        .await;
    let reason = status.iter().rev().find(|m| m.topic == "attrd/it-disk/status").unwrap().json()["alarms"][0]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("outbox database operation failed"), "{reason}");
    // Nothing was lost: the photos wait in the hot folder, none went to failed/, and the daemon runs on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(child.try_wait().unwrap().is_none(), "attrd died:\n{}", log_text());
    assert_eq!(node.files_in("").len(), 4, "{:?}\n{}", node.files_in(""), log_text());
    assert!(node.files_in("failed").is_empty(), "{:?}", node.files_in("failed"));
    assert_eq!(result_skus(&sub, "it-disk").len(), 3);

    // Space returns: the waiting photos are stored and published, and the alarm clears.
    prlimit_fsize(child.id(), "unlimited");
    sub.wait_for("every photo's result after space returned", 120, |_| result_skus(&sub, "it-disk").len() == 7).await;
    for _ in 0..200 {
        if logged("alarm cleared") && metric(port, alarm_series) == Some(0.0) && node.files_in("").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged("alarm cleared"), "{}", log_text());
    assert_eq!(metric(port, alarm_series), Some(0.0));
    assert!(node.files_in("").is_empty(), "{:?}", node.files_in(""));
    assert_eq!(node.files_in("done").len(), 7);
    assert!(node.files_in("failed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_that_drops_results_raises_an_alarm_and_counts_what_it_dropped() {
    // No broker: every result stays in the outbox, which holds two.
    let mqtt_port = crate::common::free_port();
    let node = Node::with_bundle("it-drop", mqtt_port, &repo().join("models/fashion-lite0-int8"));
    let text = std::fs::read_to_string(&node.config).unwrap();
    let text = text.replace(
        "path = \"outbox.sqlite3\"",
        "path = \"outbox.sqlite3\"\nmax_messages = 2\nwhen_full = \"drop_oldest\"",
    );
    std::fs::write(&node.config, text).unwrap();
    let mut child = node.start();
    wait_ready_within(&node, &mut child, 30).await;
    let port = node.http_port;
    let alarm_series = "attrd_alarm{alarm=\"outbox_full\"}";
    assert_eq!(metric(port, alarm_series), Some(0.0));
    assert_eq!(metric(port, "attrd_results_dropped_total"), Some(0.0));

    let skus: Vec<String> = (0..5).map(|i| format!("DROP{i}")).collect();
    node.drop_photos(&skus);
    for _ in 0..1200 {
        if node.files_in("done").len() == 5 && metric(port, "attrd_results_dropped_total") == Some(3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The policy did what it says (every photo stored, the oldest results deleted), and the operator is told.
    assert_eq!(node.files_in("done").len(), 5, "{:?}\n{}", node.files_in("done"), node.log());
    assert_eq!(metric(port, "attrd_results_dropped_total"), Some(3.0), "{}", node.log());
    assert_eq!(metric(port, alarm_series), Some(1.0), "{}", node.log());
    assert!(node.log().contains("ALARM results are being lost"), "{}", node.log());
    assert!(child.try_wait().unwrap().is_none(), "attrd died:\n{}", node.log());

    // The broker comes, the outbox drains: the cause is gone, and so is the alarm, with no new photo to clear it.
    let _broker = crate::common::Mosquitto::start_on(mqtt_port, false);
    for _ in 0..600 {
        if metric(port, alarm_series) == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(port, alarm_series), Some(0.0), "{}", node.log());
    assert!(node.log().contains("alarm cleared: the outbox has room again"), "{}", node.log());
    assert_eq!(metric(port, "attrd_results_dropped_total"), Some(3.0), "the count of what was lost stays");
}
