//! systemd integration: the notifier against a real `NOTIFY_SOCKET`, and the shipped unit, sysusers and tmpfiles files
//! checked by systemd's own tools.
//!
//! `sd_notify` reads `NOTIFY_SOCKET` from the environment, which a test must not change in its own (multi-threaded)
//! process; so the notifying side runs in a child process: this test binary again, running only `notify_child`.

use crate::common::repo;
use attrd::systemd::{Heartbeat, Notifier, run_watchdog};
use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const CHILD_MODE: &str = "ATTRD_TEST_NOTIFY_CHILD";
const WATCHDOG: Duration = Duration::from_millis(300);

/// The notifying side, run in a child process by the tests below (does nothing when run directly).
#[test]
#[ignore = "helper: runs in a child process started by the notifier tests"]
fn notify_child() {
    let Ok(mode) = std::env::var(CHILD_MODE) else { return };
    let n = Notifier::from_env();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match mode.as_str() {
        "sequence" => {
            assert!(n.is_enabled());
            assert_eq!(n.watchdog_interval(), Some(WATCHDOG));
            n.status("loading model\nimagenet-lite0");
            n.extend_timeout(Duration::from_secs(90));
            n.ready();
            rt.block_on(async {
                let hb = Heartbeat::new();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let watchdog = tokio::spawn(run_watchdog(n, hb.clone(), WATCHDOG, async move { drop(stopped.await) }));
                for _ in 0..8 {
                    hb.beat();
                    tokio::time::sleep(Duration::from_millis(75)).await;
                }
                n.status("beats stopped");
                // One interval for the last beat to go stale, plus one ping period and some slack.
                tokio::time::sleep(WATCHDOG + Duration::from_millis(200)).await;
                n.status("silent from here");
                tokio::time::sleep(Duration::from_millis(800)).await;
                n.status("beat again");
                hb.beat();
                tokio::time::sleep(Duration::from_millis(150)).await;
                n.status("resumed");
                stop.send(()).unwrap();
                watchdog.await.unwrap();
            });
            n.reloading();
            n.stopping();
        }
        "disabled" => {
            assert!(!n.is_enabled());
            assert_eq!(n.watchdog_interval(), None, "WATCHDOG_USEC alone must not enable the watchdog");
            n.ready();
            n.status("x");
            n.watchdog();
            n.stopping();
            rt.block_on(async {
                let done = run_watchdog(n, Heartbeat::new(), WATCHDOG, tokio::time::sleep(Duration::from_millis(50)));
                tokio::time::timeout(Duration::from_secs(5), done).await.unwrap();
            });
        }
        other => panic!("unknown {CHILD_MODE}={other}"),
    }
}

fn child(mode: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["systemd::notify_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_MODE, mode)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .env_remove("WATCHDOG_PID")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[track_caller]
fn assert_child_ran(out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test systemd::notify_child ... ok"),
        "child failed or did not run the helper:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn notifier_sends_ready_status_and_gated_watchdog_pings_to_notify_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let proc = child("sequence").env("NOTIFY_SOCKET", &path).spawn().unwrap();

    let mut msgs = Vec::new();
    let mut buf = [0u8; 4096];
    while !msgs.last().is_some_and(|m: &String| m.starts_with("STOPPING=1")) {
        match sock.recv(&mut buf) {
            Ok(n) => msgs.push(String::from_utf8(buf[..n].to_vec()).unwrap()),
            Err(e) => {
                let out = proc.wait_with_output().unwrap();
                panic!("no STOPPING=1 ({e}); got {msgs:?}\nchild: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
    let out = proc.wait_with_output().unwrap();
    assert_child_ran(&out);

    // Datagrams from one sender keep their order, so the status markers split the pings into phases.
    let pos = |m: &str| msgs.iter().position(|x| x == m).unwrap_or_else(|| panic!("{m:?} not in {msgs:?}"));
    assert_eq!(msgs[0], "STATUS=loading model imagenet-lite0\n", "newlines must not end the field");
    assert_eq!(msgs[1], "EXTEND_TIMEOUT_USEC=90000000\n");
    assert_eq!(msgs[2], "READY=1\n");
    let stopped = pos("STATUS=beats stopped\n");
    let silent = pos("STATUS=silent from here\n");
    let again = pos("STATUS=beat again\n");
    let resumed = pos("STATUS=resumed\n");
    let pings = |r: std::ops::Range<usize>| msgs[r].iter().filter(|m| *m == "WATCHDOG=1\n").count();
    assert!(stopped < silent && silent < again && again < resumed, "{msgs:?}");
    assert!(pings(3..stopped) >= 3, "too few pings while beating: {msgs:?}");
    assert_eq!(pings(silent..again), 0, "pinged although nothing beat for longer than the interval: {msgs:?}");
    assert!(pings(again..resumed) >= 1, "pings did not resume after a beat: {msgs:?}");
    // Every message is a known one (nothing else leaks out).
    for m in &msgs {
        assert!(
            m == "READY=1\n"
                || m == "WATCHDOG=1\n"
                || m == "STOPPING=1\n"
                || m.starts_with("STATUS=")
                || m.starts_with("EXTEND_TIMEOUT_USEC=")
                || m.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "unexpected datagram {m:?}"
        );
    }
    let reload = &msgs[msgs.len() - 2];
    let usec: u64 = reload.strip_prefix("RELOADING=1\nMONOTONIC_USEC=").unwrap().trim_end().parse().unwrap();
    assert!(usec > 0);
}

#[test]
fn notifier_is_a_no_op_without_notify_socket() {
    let out = child("disabled").output().unwrap();
    assert_child_ran(&out);
}

// ----- unit files ------------------------------------------------------------------------------------------------

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")]).find_map(|d| {
        let p = d.join(name);
        p.is_file().then_some(p)
    })
}

macro_rules! require_tool {
    ($name:expr) => {
        match tool($name) {
            Some(p) => p,
            None => {
                eprintln!("SKIPPED: {} is not installed (Debian package `systemd`)", $name);
                return;
            }
        }
    };
}

/// The shipped unit with `ExecStart` pointing at the binary this build produced (the installed path does not exist
/// here, and `verify` checks that the command is executable).
fn unit_copy(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("systemd/attrd.service")).unwrap();
    assert!(text.contains("\nExecStart=/usr/bin/attrd run --config /etc/attrd/attrd.toml\n"));
    let unit = dir.join("attrd.service");
    std::fs::write(&unit, text.replace("/usr/bin/attrd", env!("CARGO_BIN_EXE_attrd"))).unwrap();
    unit
}

fn settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.starts_with('[')) {
        if let Some((k, v)) = line.split_once('=') {
            map.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    map
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let analyze = require_tool!("systemd-analyze");
    let tmp = tempfile::tempdir().unwrap();
    let unit = unit_copy(tmp.path());
    let out = Command::new(&analyze).arg("verify").arg(&unit).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and unparsable values are only warnings (exit status 0), so any output is a failure.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stderr}");

    let s = settings(&std::fs::read_to_string(&unit).unwrap());
    let one = |k: &str| s.get(k).and_then(|v| v.last()).map(String::as_str);
    for (k, v) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("WatchdogSec", "30"),
        ("Restart", "on-failure"),
        ("User", "attrd"),
        ("StateDirectory", "attrd"),
        ("ConfigurationDirectory", "attrd"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("DevicePolicy", "closed"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("MemoryDenyWriteExecute", "yes"),
    ] {
        assert_eq!(one(k), Some(v), "{k}");
    }
    let devices = &s["DeviceAllow"];
    for d in ["char-video4linux rw", "/dev/nvidia0 rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw"] {
        assert!(devices.iter().any(|x| x == d), "DeviceAllow={d} missing: {devices:?}");
    }
    assert!(s["SystemCallFilter"].iter().any(|x| x == "@system-service"));
    assert!(one("TimeoutStopSec").is_some());

    // The check has teeth: a misspelt key is reported.
    let bad = tmp.path().join("bad.service");
    std::fs::write(&bad, std::fs::read_to_string(&unit).unwrap().replace("WatchdogSec=", "WatchdogSecs=")).unwrap();
    let out = Command::new(&analyze).arg("verify").arg(&bad).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown key 'WatchdogSecs'"));
}

/// `systemd-analyze security` exposure (0 = locked down, 10 = unprotected); docs/operations.md records the value.
#[test]
fn unit_security_exposure_stays_low() {
    let analyze = require_tool!("systemd-analyze");
    let tmp = tempfile::tempdir().unwrap();
    let unit = unit_copy(tmp.path());
    let out = Command::new(&analyze).args(["security", "--offline=yes"]).arg(&unit).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let level: f64 = stdout
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for attrd.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no exposure level in:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
        .parse()
        .unwrap();
    eprintln!("systemd-analyze security exposure: {level}");
    assert!(level <= 2.0, "exposure {level} > 2.0 (1.6 when docs/operations.md was written):\n{stdout}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_directories() {
    use std::os::unix::fs::MetadataExt;
    let sysusers = require_tool!("systemd-sysusers");
    let tmpfiles = require_tool!("systemd-tmpfiles");
    if !is_root() {
        eprintln!("SKIPPED: systemd-tmpfiles --root needs root to chown");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let run = |tool: &Path, extra: &[&str], file: &str| {
        let out = Command::new(tool)
            .arg(format!("--root={}", root.path().display()))
            .args(extra)
            .arg(repo().join("systemd").join(file))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{} {file}: {stderr}", tool.display());
        assert!(!stderr.contains("Failed") && !stderr.contains("ignoring"), "{} {file}: {stderr}", tool.display());
    };
    run(&sysusers, &[], "attrd.sysusers.conf");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user = passwd.lines().find(|l| l.starts_with("attrd:")).expect("attrd user");
    let f: Vec<&str> = user.split(':').collect();
    assert_eq!((f[4], f[5]), ("attrd daemon", "/var/lib/attrd"), "{user}");
    assert!(f[6].ends_with("nologin"), "{user}");
    let uid: u32 = f[2].parse().unwrap();
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    let video = group.lines().find(|l| l.starts_with("video:")).expect("video group");
    assert!(video.rsplit(':').next().unwrap().split(',').any(|m| m == "attrd"), "{video}");
    let gid: u32 = group
        .lines()
        .find(|l| l.starts_with("attrd:"))
        .expect("attrd group")
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();

    run(&tmpfiles, &["--create"], "attrd.tmpfiles.conf");
    for (dir, mode, owner, group) in
        [("var/lib/attrd", 0o750, uid, gid), ("var/lib/attrd/models", 0o750, uid, gid), ("etc/attrd", 0o750, 0, gid)]
    {
        let m = std::fs::metadata(root.path().join(dir)).unwrap();
        assert!(m.is_dir(), "{dir}");
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (mode, owner, group), "{dir}");
    }
}
