//! The `attrd` binary as a user runs it.

use crate::common::{fashion_rows, imagenet_bundle, repo};
use std::process::Command;

fn attrd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attrd"))
}

#[test]
fn infer_prints_one_json_object_per_image_and_one_error_line_per_bad_file() {
    let rows = fashion_rows();
    let tshirt = &rows.iter().find(|r| r.2 == "Tshirts").unwrap().1;
    let sunglasses = &rows.iter().find(|r| r.2 == "Sunglasses").unwrap().1;
    let tmp = tempfile::tempdir().unwrap();
    let corrupt = tmp.path().join("corrupt.jpg");
    std::fs::write(&corrupt, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
    let missing = tmp.path().join("missing.jpg");
    let out = attrd()
        .args(["infer", "--providers", "cpu", "--bundle"])
        .arg(imagenet_bundle())
        .arg(tshirt)
        .arg(&corrupt)
        .arg(sunglasses)
        .arg(&missing)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "bad files make the exit status non-zero; stderr: {stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0]["image"], tshirt.display().to_string());
    assert_eq!(lines[1]["image"], sunglasses.display().to_string());
    assert_eq!(lines[0]["model"]["name"], "imagenet-lite0");
    assert_eq!(lines[0]["model"]["execution_provider"], "cpu");
    let top = |l: &serde_json::Value| -> Vec<String> {
        l["attributes"]["imagenet"]["topk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["value"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(top(&lines[0]).iter().any(|v| v.contains("jersey")), "{:?}", top(&lines[0]));
    assert!(top(&lines[1]).iter().any(|v| v.contains("sunglass")), "{:?}", top(&lines[1]));
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("attrd: /")).collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(errors[0].contains("corrupt.jpg"), "{stderr}");
    assert!(errors[1].contains("missing.jpg") && errors[1].contains("No such file"), "{stderr}");
}

#[test]
fn model_verify_requires_a_key_or_an_explicit_opt_out() {
    let out = attrd().args(["model", "verify"]).arg(imagenet_bundle()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trusted-key"));
    let demo_key = crate::common::repo().join("config/keys/attrd-demo.pub");
    let out =
        attrd().args(["model", "verify", "--trusted-key"]).arg(&demo_key).arg(imagenet_bundle()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("imagenet-lite0@1.0.0: ok"));
    // A key that did not sign it is refused, naming the signer.
    let tmp = tempfile::tempdir().unwrap();
    let (_, other) =
        attrd::bundle::write_keypair(&ed25519_dalek::SigningKey::from_bytes(&[4; 32]), &tmp.path().join("k")).unwrap();
    let out = attrd().args(["model", "verify", "--trusted-key"]).arg(&other).arg(imagenet_bundle()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not trusted"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `attrd bench` runs the daemon's path end to end against a real mosquitto: every photo's result reaches a
/// subscriber, and the report carries the throughput and every stage's latency. An unreachable broker is a clear
/// error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_the_daemon_path_end_to_end_and_reports_stage_latencies() {
    let broker = crate::common::Mosquitto::start();
    let sub = crate::mqtt::Sub::start(broker.port, "it-bench-sub", &["attrd/it-bench/results/#"], false).await;
    let images = crate::common::repo().join("config/demo-images");
    let expected = std::fs::read_dir(&images).unwrap().count();
    let out = attrd()
        .args(["bench", "--bundle"])
        .arg(crate::common::repo().join("models/fashion-lite0-int8"))
        .arg("--trusted-key")
        .arg(crate::common::repo().join("config/keys/attrd-demo.pub"))
        .arg("--images")
        .arg(&images)
        .args(["--node", "it-bench", "--batch", "4", "--json", "--mqtt-port", &broker.port.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["images"], expected);
    assert_eq!(r["results"], expected);
    assert_eq!(r["failed"], 0);
    assert_eq!(r["precision"], "int8");
    assert!(r["images_per_s"].as_f64().unwrap() > 0.0, "{r}");
    for stage in ["preprocess", "queue", "infer", "store", "total"] {
        let q = &r["latency_ms"][stage];
        let (p50, p99) = (q["p50"].as_f64().unwrap(), q["p99"].as_f64().unwrap());
        assert!(0.0 <= p50 && p50 <= p99 && p99 <= q["max"].as_f64().unwrap(), "{stage}: {q}");
    }
    assert!(r["latency_ms"]["infer"]["p50"].as_f64().unwrap() > 0.0, "{r}");
    // Every result was acknowledged by the broker before the report, so the subscriber gets every SKU.
    let msgs = sub.wait_for("every bench result", 30, |m| m.len() >= expected).await;
    let skus: std::collections::BTreeSet<String> =
        msgs.iter().map(|m| m.json()["sku"].as_str().unwrap().to_string()).collect();
    assert_eq!(skus.len(), expected, "{skus:?}");
    assert!(skus.contains("SKU1163_front"), "{skus:?}");

    let port = crate::common::free_port();
    let out = attrd()
        .args(["bench", "--bundle"])
        .arg(crate::common::repo().join("models/fashion-lite0-int8"))
        .arg("--images")
        .arg(&images)
        .args(["--mqtt-port", &port.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach the MQTT broker at 127.0.0.1:{port}")), "{stderr}");
}

/// The shipped INT8 bundle gives the same results on an x86 CPU whose integer kernels saturate (AVX2 without VNNI)
/// and on one whose kernels cannot (SSE2), both emulated with qemu-user: what `scripts/check-int8-portability`
/// checks, run on the real binary, bundle and demo photos. (The trainer's CLI test shows the same check failing on a
/// bundle with unconstrained 8-bit weights.)
#[cfg(target_arch = "x86_64")]
#[test]
fn the_default_bundle_agrees_on_cpus_with_and_without_saturating_int8_kernels() {
    let repo = crate::common::repo();
    let mut photos: Vec<_> = std::fs::read_dir(repo.join("config/demo-images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    photos.sort();
    photos.truncate(8);
    let out = Command::new(repo.join("scripts/check-int8-portability"))
        .arg(repo.join("models/fashion-lite0-int8"))
        .args(&photos)
        .env("ATTRD", env!("CARGO_BIN_EXE_attrd"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("on 8 photos"), "{stdout}");
}

/// `attrd model test` runs a bundle's self-test where it is run, without installing anything: the shipped INT8 bundle
/// passes on this CPU and on an emulated x86 CPU whose integer kernels saturate (AVX2 without VNNI), each time
/// within its packaged CPU result's tolerance. A bundle whose golden set this machine does not reproduce fails with
/// the image and attribute named, and one signed by nobody trusted is not run at all.
#[test]
fn model_test_self_tests_a_bundle_on_this_machine() {
    let repo = crate::common::repo();
    let bundle = repo.join("models/fashion-lite0-int8");
    let key = repo.join("config/keys/attrd-demo.pub");
    // `emulate`: run under qemu-user as this x86 CPU model.
    let run = |emulate: Option<&str>, bundle: &std::path::Path, key: &std::path::Path| {
        let mut cmd = match emulate {
            Some(cpu) => {
                let mut c = Command::new("qemu-x86_64");
                c.args(["-cpu", cpu, env!("CARGO_BIN_EXE_attrd")]);
                c
            }
            None => attrd(),
        };
        let out =
            cmd.args(["model", "test", "--providers", "cpu", "--trusted-key"]).arg(key).arg(bundle).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(None, &bundle, &key);
    assert!(ok, "{text}");
    assert!(text.contains("fashion-attributes@1.0.0: self-test: golden set passed on cpu (32 images"), "{text}");
    assert!(text.contains("packaged CPU result max |dp|"), "{text}");
    if cfg!(target_arch = "x86_64") {
        let (ok, text) = run(Some("Haswell"), &bundle, &key);
        assert!(ok && text.contains("packaged CPU result max |dp|"), "{text}");
    }

    // The ImageNet bundle's references moved past its tolerance, re-signed with a test key the command trusts.
    let tmp = tempfile::tempdir().unwrap();
    let skewed = crate::models::variant(tmp.path(), "9.0.0", Some(&crate::models::test_key()), 0.05);
    let (_, test_pub) = attrd::bundle::write_keypair(&crate::models::test_key(), &tmp.path().join("test")).unwrap();
    let (ok, text) = run(None, &skewed, &test_pub);
    assert!(!ok, "{text}");
    assert!(text.contains("imagenet-lite0@9.0.0 failed its self-test on cpu: golden/"), "{text}");
    assert!(text.contains("probabilities differ by"), "{text}");
    let (ok, text) = run(None, &skewed, &key);
    assert!(!ok && text.contains("not trusted"), "{text}");
}

/// `attrd model … --config` takes the models directory, keys and engine settings from the daemon's configuration, so
/// an activation from the command line self-tests as the service would (here: its ONNX Runtime library).
#[test]
fn model_commands_can_take_the_daemons_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let key = repo().join("config/keys/attrd-demo.pub");
    let write = |name: &str, engine: &str| {
        let path = tmp.path().join(name);
        let text = format!("[engine]\n{engine}\n[models]\ndir = \"models\"\ntrusted_keys = [\"{}\"]\n", key.display());
        std::fs::write(&path, text).unwrap();
        path
    };
    let broken = write("broken.toml", "ort_library = \"/nonexistent/libonnxruntime.so\"");
    let out = attrd()
        .args(["model", "install", "--activate", "--config"])
        .arg(&broken)
        .arg(imagenet_bundle())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("/nonexistent/libonnxruntime.so"), "{err}");
    // Installed into the configured directory (relative to the file), but not activated.
    assert!(tmp.path().join("models/imagenet-lite0-1.0.0/manifest.json").is_file());

    let good = write("good.toml", "providers = [\"cpu\"]");
    let out = attrd().args(["model", "activate", "imagenet-lite0-1.0.0", "--config"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = attrd().args(["model", "list", "--config"]).arg(&good).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.lines().any(|l| l.starts_with('*') && l.contains("imagenet-lite0-1.0.0")), "{list}");
    // Flags that the configuration already gives are refused with it, not silently ignored.
    let out = attrd().args(["model", "list", "--config"]).arg(&good).arg("--models-dir").arg("/tmp").output().unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
