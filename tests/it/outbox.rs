//! The durable outbox on real SQLite files: order, acknowledgement, sequence numbers across restarts and crashes,
//! both full policies, and clear errors for unusable paths.

use std::collections::HashSet;
use std::path::Path;

use attrd::outbox::{CoveredFile, FileVersion, FullPolicy, KeptFrame, NewMessage, Outbox, OutboxConfig, OutboxError};
use serde_json::json;

fn cfg(dir: &Path) -> OutboxConfig {
    OutboxConfig { path: dir.join("state/outbox.sqlite3"), ..OutboxConfig::default() }
}

async fn put(o: &Outbox, i: u64) -> attrd::outbox::Enqueued {
    o.enqueue(format!("attrd/it/results/sku-{i}"), json!({"sku": format!("sku-{i}"), "i": i}), 1, false).await.unwrap()
}

#[tokio::test]
async fn enqueue_next_batch_and_ack_keep_order() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(&cfg(dir.path())).unwrap();
    assert!(dir.path().join("state/outbox.sqlite3").is_file(), "directory and file are created");
    let mut done = Vec::new();
    for i in 0..10 {
        done.push(put(&o, i).await);
    }
    assert!(done.windows(2).all(|w| w[0].id < w[1].id && w[0].seq + 1 == w[1].seq), "{done:?}");
    assert_eq!(done[0].seq, 1);

    let first = o.next_batch(None, 4).await.unwrap();
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    let rest = o.next_batch(Some(first[3].id), 100).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6, 7, 8, 9, 10]);
    let e = &first[2];
    assert_eq!(e.topic, "attrd/it/results/sku-2");
    assert_eq!((e.qos, e.retain), (1, false));
    assert_eq!(e.message_id, done[2].message_id);
    assert_eq!(e.payload["i"], 2);

    // Acks arrive out of order (QoS 1 allows it); what is left stays oldest-first.
    for k in [0usize, 5, 2, 9] {
        o.ack(done[k].id).await.unwrap();
    }
    o.ack(done[0].id).await.unwrap(); // a duplicate ack is harmless
    let left = o.next_batch(None, 100).await.unwrap();
    assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 4, 5, 7, 8, 9]);
    let d = o.depth();
    assert_eq!(d.messages, 6);
    let bytes: u64 = left.iter().map(|e| e.payload.to_string().len() as u64).sum();
    assert_eq!(d.bytes, bytes);
    assert!(d.oldest_age.is_some());

    for e in &left {
        o.ack(e.id).await.unwrap();
    }
    assert_eq!(o.depth().messages, 0);
    assert_eq!(o.depth().bytes, 0);
    assert_eq!(o.depth().oldest_age, None);
    assert!(o.next_batch(None, 10).await.unwrap().is_empty());

    // Ids keep growing after the table was emptied, so a publisher's cursor never skips a new row.
    let after = put(&o, 99).await;
    assert!(after.id > done[9].id);
    assert_eq!(o.next_batch(Some(done[9].id), 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn payload_carries_seq_and_message_id_and_seq_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    let mut ids = HashSet::new();
    {
        let o = Outbox::open(&c).unwrap();
        for i in 0..3 {
            let e = put(&o, i).await;
            ids.insert(e.message_id);
            o.ack(e.id).await.unwrap();
        }
        assert_eq!(o.depth().messages, 0);
    }
    let o = Outbox::open(&c).unwrap();
    let e = o.enqueue("attrd/it/results/x".into(), json!({"seq": "caller's", "keep": [1, 2]}), 0, true).await.unwrap();
    assert_eq!(e.seq, 4, "seq continues after a restart even though the table was empty");
    assert!(ids.insert(e.message_id));
    assert_eq!(e.message_id.get_version_num(), 7);

    let stored = o.next_batch(None, 1).await.unwrap().remove(0);
    assert_eq!(stored.payload, json!({"seq": 4, "message_id": e.message_id.to_string(), "keep": [1, 2]}));
    assert_eq!((stored.qos, stored.retain), (0, true));
}

#[tokio::test]
async fn concurrent_enqueues_get_unique_increasing_seq() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(&cfg(dir.path())).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let o = o.clone();
        tasks.spawn(async move { put(&o, i).await });
    }
    let mut got: Vec<_> = tasks.join_all().await;
    got.sort_by_key(|e| e.id);
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=64).collect::<Vec<_>>(), "seq follows id order");
    assert_eq!(got.iter().map(|e| e.message_id).collect::<HashSet<_>>().len(), 64);
    assert_eq!(o.depth().messages, 64);
}

/// A group stored with `enqueue_many`: one verdict per message in order, bad messages refused on their own, a
/// waiting duplicate id answered with the stored message, and a full outbox refusing only what does not fit.
#[tokio::test]
async fn enqueue_many_judges_each_message_and_commits_the_rest_together() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(&OutboxConfig { max_messages: 4, ..cfg(dir.path()) }).unwrap();
    let msg = |topic: &str, payload: serde_json::Value, id: u128| NewMessage {
        topic: topic.into(),
        payload,
        qos: 1,
        retain: false,
        message_id: uuid::Uuid::from_u128(id),
        covers: Vec::new(),
        releases: Vec::new(),
    };
    let first = o.enqueue_with_id("attrd/it/results/a".into(), json!({"i": 0}), 1, false, uuid::Uuid::from_u128(1));
    let first = first.await.unwrap();
    let out = o
        .enqueue_many(vec![
            msg("attrd/it/results/b", json!({"i": 1}), 2),
            msg("attrd/it/results/+", json!({"i": 2}), 3),
            msg("attrd/it/results/c", json!([1, 2]), 4),
            msg("attrd/it/results/a", json!({"i": 0}), 1),
            msg("attrd/it/results/d", json!({"i": 3}), 5),
            msg("attrd/it/results/e", json!({"i": 4}), 6),
            msg("attrd/it/results/f", json!({"i": 5}), 7),
        ])
        .await;
    assert_eq!(out.len(), 7);
    assert_eq!(out[0].as_ref().unwrap().seq, 2);
    assert!(matches!(out[1], Err(OutboxError::InvalidTopic(_))), "{:?}", out[1]);
    assert!(matches!(out[2], Err(OutboxError::NotAnObject("an array"))), "{:?}", out[2]);
    assert_eq!(out[3].as_ref().unwrap(), &first, "a waiting id is not stored twice");
    assert_eq!(out[4].as_ref().unwrap().seq, 3);
    assert_eq!(out[5].as_ref().unwrap().seq, 4);
    assert!(matches!(out[6], Err(OutboxError::Full { messages: 4, .. })), "{:?}", out[6]);
    let stored = o.next_batch(None, 100).await.unwrap();
    assert_eq!(stored.iter().map(|e| e.payload["i"].as_i64().unwrap()).collect::<Vec<_>>(), [0, 1, 3, 4]);
    assert!(o.enqueue_many(Vec::new()).await.is_empty());
}

#[tokio::test]
async fn full_with_reject_new_refuses_new_and_keeps_everything_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(&OutboxConfig { max_messages: 3, ..cfg(dir.path()) }).unwrap();
    let accepted = [put(&o, 0).await, put(&o, 1).await, put(&o, 2).await];
    let err = o.enqueue("attrd/it/results/x".into(), json!({}), 1, false).await.unwrap_err();
    assert!(matches!(err, OutboxError::Full { messages: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("outbox full"), "{err}");
    assert_eq!(o.next_batch(None, 10).await.unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);

    // Room again after an ack; the rejected message used no sequence number.
    o.ack(accepted[0].id).await.unwrap();
    assert_eq!(put(&o, 3).await.seq, 4);

    // The byte limit works the same way, and a message bigger than the whole outbox is refused outright.
    let dir2 = tempfile::tempdir().unwrap();
    let o = Outbox::open(&OutboxConfig { max_bytes: 200, ..cfg(dir2.path()) }).unwrap();
    let pad = "x".repeat(60);
    o.enqueue("t/a".into(), json!({"pad": pad}), 1, false).await.unwrap();
    let err = o.enqueue("t/a".into(), json!({"pad": pad}), 1, false).await.unwrap_err();
    assert!(matches!(err, OutboxError::Full { messages: 1, .. }), "{err:?}");
    let err = o.enqueue("t/a".into(), json!({"pad": "y".repeat(300)}), 1, false).await.unwrap_err();
    assert!(matches!(err, OutboxError::TooLarge { max_bytes: 200, .. }), "{err:?}");
    assert_eq!(o.depth().messages, 1);
}

#[tokio::test]
async fn full_with_drop_oldest_drops_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let o =
        Outbox::open(&OutboxConfig { max_messages: 3, when_full: FullPolicy::DropOldest, ..cfg(dir.path()) }).unwrap();
    let mut last = None;
    for i in 0..5 {
        let e = put(&o, i).await;
        // The first three fit; each later one deletes the oldest.
        assert_eq!(e.dropped, u64::from(i >= 3), "message {i}");
        last = Some(e);
    }
    let left = o.next_batch(None, 10).await.unwrap();
    assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(left[2].message_id, last.unwrap().message_id);
    assert_eq!(o.depth().messages, 3);
}

#[tokio::test]
async fn rejects_bad_input_without_storing_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(&cfg(dir.path())).unwrap();
    let e = o.enqueue("attrd/it/results/x".into(), json!([1, 2]), 1, false).await.unwrap_err();
    assert!(matches!(e, OutboxError::NotAnObject("an array")), "{e:?}");
    for topic in ["", "attrd/+/x", "attrd/#", "a\0b"] {
        let e = o.enqueue(topic.into(), json!({}), 1, false).await.unwrap_err();
        assert!(matches!(e, OutboxError::InvalidTopic(_)), "{topic:?}: {e:?}");
    }
    for qos in [2, 3] {
        // QoS 2 too: rumqttc reuses its packet id after PUBREC, before the PUBCOMP that would delete the row.
        let e = o.enqueue("a".into(), json!({}), qos, false).await.unwrap_err();
        assert!(matches!(e, OutboxError::InvalidQos(q) if q == qos), "{e:?}");
        assert!(e.to_string().contains("(0 or 1)"), "{e}");
    }
    assert_eq!(o.depth().messages, 0);
    assert_eq!(put(&o, 0).await.seq, 1);
}

#[tokio::test]
async fn unusable_paths_give_clear_errors_and_the_process_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // The "directory" is a regular file: creating the state directory must fail, not panic.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let err = Outbox::open(&OutboxConfig { path: blocker.join("sub/outbox.sqlite3"), ..OutboxConfig::default() })
        .unwrap_err();
    assert!(matches!(err, OutboxError::CreateDir { .. }), "{err:?}");
    assert!(err.to_string().contains("not-a-dir"), "error names the path: {err}");
    assert!(std::error::Error::source(&err).is_some(), "the I/O cause is kept");

    // The database path is a directory.
    let as_dir = dir.path().join("db-is-a-dir");
    std::fs::create_dir(&as_dir).unwrap();
    let err = Outbox::open(&OutboxConfig { path: as_dir.clone(), ..OutboxConfig::default() }).unwrap_err();
    assert!(matches!(err, OutboxError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("db-is-a-dir"), "{err}");

    // Not an SQLite file at all.
    let junk = dir.path().join("junk.sqlite3");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let err = Outbox::open(&OutboxConfig { path: junk, ..OutboxConfig::default() }).unwrap_err();
    assert!(matches!(err, OutboxError::Open { .. }), "{err:?}");

    // A zero limit is a configuration error.
    let err = Outbox::open(&OutboxConfig { max_messages: 0, ..cfg(dir.path()) }).unwrap_err();
    assert!(matches!(err, OutboxError::Config(_)), "{err:?}");

    // The process is fine and a good path still works.
    let o = Outbox::open(&cfg(dir.path())).unwrap();
    assert_eq!(put(&o, 1).await.seq, 1);
}

fn frame(sku: &str, n: usize) -> KeptFrame {
    KeptFrame {
        camera: "front".into(),
        sku: sku.into(),
        jpeg: (0..n).map(|i| (i % 251) as u8).collect(),
        captured_at: time::macros::datetime!(2026-12-07 03:04:05.123456789 UTC),
        replayed: false,
        retry_min: std::time::Duration::from_millis(250),
        retry_max: std::time::Duration::from_secs(30),
    }
}

/// Camera frames kept beside the results survive a reopen exactly as they were, apart from the results' limits,
/// and leave only when released: by their result's transaction, or on their own.
#[tokio::test]
async fn kept_frames_survive_a_reopen_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let c = OutboxConfig { max_messages: 1, ..cfg(dir.path()) };
    let o = Outbox::open(&c).unwrap();
    put(&o, 1).await;
    assert!(matches!(o.enqueue("t/x".into(), json!({}), 1, false).await, Err(OutboxError::Full { .. })));
    // A full outbox still keeps frames: they are what waits for room.
    let a = o.keep_frame(frame("A", 3_000_000)).await.unwrap();
    let b = o.keep_frame(KeptFrame { replayed: true, ..frame("B", 10) }).await.unwrap();
    assert!(a < b);
    assert_eq!(o.depth().messages, 1, "frames are not results");
    // A frame's result that is refused does not release it; one that is stored does, in its transaction.
    let result_of = |key: i64, sku: &str| NewMessage {
        topic: format!("attrd/it/results/{sku}"),
        payload: json!({"sku": sku}),
        qos: 1,
        retain: false,
        message_id: uuid::Uuid::now_v7(),
        covers: Vec::new(),
        releases: vec![key],
    };
    let refused = o.enqueue_many(vec![result_of(a, "A")]).await.pop().unwrap();
    assert!(matches!(refused, Err(OutboxError::Full { .. })), "{refused:?}");
    assert_eq!(o.kept_frames().await.unwrap().len(), 2);
    let k = o.keep_frame(frame("C", 10)).await.unwrap();
    o.ack(o.next_batch(None, 1).await.unwrap()[0].id).await.unwrap();
    o.enqueue_many(vec![result_of(k, "C")]).await.pop().unwrap().unwrap();
    assert_eq!(o.kept_frames().await.unwrap().iter().map(|(k, _)| *k).collect::<Vec<_>>(), [a, b]);
    drop(o);

    let o = Outbox::open(&c).unwrap();
    let kept = o.kept_frames().await.unwrap();
    assert_eq!(kept, vec![(a, frame("A", 3_000_000)), (b, KeptFrame { replayed: true, ..frame("B", 10) })]);
    o.release_frame(a).await.unwrap();
    o.release_frame(a).await.unwrap(); // twice is harmless
    drop(o);
    let o = Outbox::open(&c).unwrap();
    assert_eq!(
        o.kept_frames().await.unwrap().iter().map(|(k, f)| (*k, f.sku.as_str())).collect::<Vec<_>>(),
        [(b, "B")]
    );
    assert_eq!(o.next_batch(None, 10).await.unwrap()[0].payload["sku"], "C", "the result is still there");
}

fn covered(dir: &Path, name: &str, ino: u64) -> CoveredFile {
    CoveredFile { path: dir.join(name), version: FileVersion { dev: u64::MAX - 1, ino, len: 1 << 40, mtime_ns: -5 } }
}

/// The hot-folder files a result covers are recorded in its transaction: with the result, also when it was stored
/// before (same `message_id`), never with a refused one; read back per folder, across a reopen; only the newest
/// `COVERED_FILES_KEPT` are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covered_files_are_recorded_with_their_result_and_pruned_to_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let c = OutboxConfig { max_messages: 2, ..cfg(dir.path()) };
    let o = Outbox::open(&c).unwrap();
    let (hot, other) = (Path::new("/srv/hot"), Path::new("/srv/other"));
    let msg = |id: u128, covers: Vec<CoveredFile>| NewMessage {
        topic: format!("attrd/it/results/s{id}"),
        payload: json!({"i": id as u64}),
        qos: 1,
        retain: false,
        message_id: uuid::Uuid::from_u128(id),
        covers,
        releases: Vec::new(),
    };
    let a = vec![covered(hot, "A_front.jpg", 1), covered(hot, "A_side.jpg", 2), covered(other, "A.jpg", 3)];
    o.enqueue_many(vec![msg(1, a.clone())]).await.pop().unwrap().unwrap();
    // The same result again (its photo processed twice) records the file again; still one message.
    o.enqueue_many(vec![msg(1, vec![covered(hot, "A_back.jpg", 4)])]).await.pop().unwrap().unwrap();
    o.enqueue_many(vec![msg(2, vec![])]).await.pop().unwrap().unwrap();
    // Refused (full): nothing of it is recorded.
    let refused = o.enqueue_many(vec![msg(3, vec![covered(hot, "B.jpg", 5)])]).await.pop().unwrap();
    assert!(matches!(refused, Err(OutboxError::Full { .. })), "{refused:?}");
    assert_eq!(o.depth().messages, 2);
    drop(o);

    let o = Outbox::open(&c).unwrap();
    let in_hot = tokio::task::block_in_place(|| o.covered_files_blocking(hot)).unwrap();
    let id1 = uuid::Uuid::from_u128(1);
    assert_eq!(
        in_hot,
        vec![(a[0].clone(), id1), (a[1].clone(), id1), (covered(hot, "A_back.jpg", 4), id1)],
        "u64 and negative fields come back bit for bit"
    );
    let in_other = tokio::task::block_in_place(|| o.covered_files_blocking(other)).unwrap();
    assert_eq!(in_other, vec![(a[2].clone(), id1)]);
    assert!(tokio::task::block_in_place(|| o.covered_files_blocking(Path::new("/srv"))).unwrap().is_empty());

    // Pruned to the newest in the same transaction.
    for e in o.next_batch(None, 10).await.unwrap() {
        o.ack(e.id).await.unwrap();
    }
    let many: Vec<CoveredFile> = (0..attrd::outbox::COVERED_FILES_KEPT as u64 + 5)
        .map(|i| covered(hot, &format!("M{i}.jpg"), 100 + i))
        .collect();
    o.enqueue_many(vec![msg(9, many.clone())]).await.pop().unwrap().unwrap();
    let left = tokio::task::block_in_place(|| o.covered_files_blocking(hot)).unwrap();
    assert_eq!(left.len() as i64, attrd::outbox::COVERED_FILES_KEPT);
    assert_eq!(left[0].0, many[5], "the oldest went first");
    assert_eq!(left.last().unwrap().0, *many.last().unwrap());
}

/// A database written by the previous release (schema 2: no frames, no covered files) is migrated in place, its results kept.
#[tokio::test]
async fn a_schema_2_outbox_is_migrated_and_keeps_its_results() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    let o = Outbox::open(&c).unwrap();
    put(&o, 7).await;
    drop(o);
    let conn = rusqlite::Connection::open(&c.path).unwrap();
    conn.execute_batch("DROP TABLE kept_frames; DROP TABLE covered_files; PRAGMA user_version = 2;").unwrap();
    drop(conn);
    let o = Outbox::open(&c).unwrap();
    assert_eq!(o.next_batch(None, 10).await.unwrap()[0].payload["i"], 7);
    let k = o.keep_frame(frame("C", 100)).await.unwrap();
    assert_eq!(o.kept_frames().await.unwrap(), vec![(k, frame("C", 100))]);
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    drop(Outbox::open(&c).unwrap());
    rusqlite_set_user_version(&c.path, 99);
    let err = Outbox::open(&c).unwrap_err();
    assert!(matches!(err, OutboxError::SchemaTooNew { found: 99, supported: 3, .. }), "{err:?}");
}

/// Bumps `user_version` with the sqlite3 format's header field (offset 60, big-endian), without an SQLite client.
fn rusqlite_set_user_version(path: &Path, v: u32) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(60)).unwrap();
    f.write_all(&v.to_be_bytes()).unwrap();
}

const CRASH_ENV: &str = "ATTRD_IT_OUTBOX_CRASH_DIR";

/// Not a test on its own: `unacknowledged_entries_survive_a_crash` runs this in a child process that enqueues,
/// acknowledges a few and then aborts without any cleanup.
#[tokio::test]
async fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_ENV) else { return };
    let o = Outbox::open(&cfg(Path::new(&dir))).unwrap();
    let mut done = Vec::new();
    for i in 0..25 {
        done.push(put(&o, i).await);
    }
    for e in &done[..5] {
        o.ack(e.id).await.unwrap();
    }
    println!("enqueued 25, acked 5");
    std::process::abort();
}

#[test]
fn unacknowledged_entries_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["outbox::crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the child must die by abort: {stdout}");
    assert!(stdout.contains("enqueued 25, acked 5"), "child did not get to the crash: {stdout}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let o = Outbox::open(&cfg(dir.path())).unwrap();
        assert_eq!(o.depth().messages, 20);
        let left = o.next_batch(None, 100).await.unwrap();
        assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), (6..=25).collect::<Vec<_>>());
        assert!(left.iter().all(|e| e.payload["message_id"] == e.message_id.to_string()));
        assert_eq!(put(&o, 25).await.seq, 26);
    });
}

const DISK_FULL_ENV: &str = "ATTRD_IT_OUTBOX_DISK_FULL_DIR";

/// Not a test on its own: `a_full_disk_gives_errors_not_panics_and_loses_nothing` runs this in a child process
/// whose file size limit (`ulimit -f`) plays a full disk.
#[tokio::test]
async fn disk_full_child() {
    let Some(dir) = std::env::var_os(DISK_FULL_ENV) else { return };
    let o = Outbox::open(&cfg(Path::new(&dir))).unwrap();
    let pad = "p".repeat(4096);
    let mut accepted = 0u64;
    let mut failure = None;
    for i in 0..2000 {
        match o.enqueue(format!("attrd/it/results/{i}"), json!({"pad": pad}), 1, false).await {
            Ok(e) => {
                assert_eq!(e.seq, accepted + 1);
                accepted += 1;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let e = failure.expect("the file size limit was never hit");
    assert!(matches!(e, OutboxError::Sqlite(_)), "{e:?}");
    // Still answering: reads work and the counters match what was committed.
    assert_eq!(o.depth().messages, accepted);
    assert_eq!(o.next_batch(None, 10_000).await.unwrap().len() as u64, accepted);
    let again = o.enqueue("attrd/it/results/x".into(), json!({"pad": pad}), 1, false).await;
    assert!(again.is_err(), "still no space");
    println!("accepted {accepted}; then: {e}: {}", std::error::Error::source(&e).unwrap());
}

#[test]
fn a_full_disk_gives_errors_not_panics_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // SIGXFSZ is ignored so that writes past the limit fail with EFBIG instead of killing the process.
    let script =
        "trap '' XFSZ; ulimit -f 1024; exec \"$0\" outbox::disk_full_child --exact --nocapture --test-threads=1";
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .arg(&exe)
        .env(DISK_FULL_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("accepted ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no report: {stdout}"));
    let accepted: u64 = line.split(';').next().unwrap().parse().unwrap();
    assert!(accepted > 10, "{line}");

    // Space is back: everything committed before the failure is there, in order, and the outbox goes on.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let o = Outbox::open(&cfg(dir.path())).unwrap();
        assert_eq!(o.depth().messages, accepted, "{line}");
        let all = o.next_batch(None, 10_000).await.unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=accepted).collect::<Vec<_>>());
        assert_eq!(put(&o, 0).await.seq, accepted + 1);
    });
}

/// A message with a caller-chosen id is stored once while it waits; after it was acknowledged the same id may be
/// stored (and published) again — a duplicate with the same `message_id`, which subscribers drop.
#[tokio::test]
async fn enqueue_with_id_is_idempotent_while_the_message_waits() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(&cfg(dir.path())).unwrap();
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, b"node/sku/photo");
    let a = o.enqueue_with_id("attrd/it/results/a".into(), json!({"n": 1}), 1, false, id).await.unwrap();
    let b = o.enqueue_with_id("attrd/it/results/a".into(), json!({"n": 2}), 1, false, id).await.unwrap();
    assert_eq!((a.id, a.seq, a.message_id), (b.id, b.seq, b.message_id));
    assert_eq!(o.depth().messages, 1);
    let batch = o.next_batch(None, 10).await.unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].payload["n"], 1, "the first stored version is kept");
    assert_eq!(batch[0].payload["message_id"], id.to_string());
    o.ack(a.id).await.unwrap();
    let c = o.enqueue_with_id("attrd/it/results/a".into(), json!({"n": 3}), 1, false, id).await.unwrap();
    assert_ne!(c.id, a.id);
    assert_eq!(c.message_id, id);
    // Survives reopening (the lookup index is part of the schema).
    drop(o);
    let o = Outbox::open(&cfg(dir.path())).unwrap();
    let d = o.enqueue_with_id("attrd/it/results/a".into(), json!({"n": 4}), 1, false, id).await.unwrap();
    assert_eq!(d.id, c.id);
}
