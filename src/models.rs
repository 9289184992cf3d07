//! The node's model store: installed bundle versions, which one is active, and the self-test that guards activation.
//!
//! Layout under the models directory (this module and `bundle` are the only code that knows it):
//! `<name>-<version>/` per installed bundle, and `state.json` naming the active bundle and the activation history.
//! `state.json` is replaced atomically, so a crash mid-activation leaves either the old or the new state.

use crate::bundle::{self, Bundle, BundleError, SignatureStatus, TrustedKeys, Unopened};
use crate::engine::{Engine, EngineConfig, EngineError, Provider, postprocess};
use crate::preprocess::{Limits, Preprocessor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const STATE_FILE: &str = "state.json";
/// How many previous activations `rollback` can go back through.
const HISTORY: usize = 10;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no installed bundle is called {0:?} (see `attrd model list`)")]
    NotInstalled(String),
    #[error("{label} is already installed")]
    AlreadyInstalled {
        /// The bundle, for people.
        label: String,
        /// Its directory in the store: what `activate` takes.
        id: String,
    },
    #[error("no model is active")]
    NoneActive,
    #[error("nothing to roll back to: no previous activation is recorded")]
    NoPrevious,
    #[error("cannot load {label}: {source}")]
    Engine {
        label: String,
        #[source]
        source: EngineError,
    },
    #[error("{label} failed its self-test on {provider}: {reason}")]
    SelfTest { label: String, provider: String, reason: String },
    #[error("state file {path} is corrupt: {reason}")]
    State { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

/// Which bundle serves, and what served before it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Directory name of the active bundle (`<name>-<version>`).
    pub active: Option<String>,
    /// Previously active bundles, most recent first.
    pub previous: Vec<String>,
}

/// One installed bundle, as `attrd model list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub id: String,
    pub label: String,
    pub precision: String,
    pub active: bool,
    pub signed_by: Option<String>,
}

/// Result of running a bundle's golden set (or smoke test) on a loaded engine.
#[derive(Debug, Clone, Serialize)]
pub struct SelfTestReport {
    pub provider: String,
    /// Golden images checked (0 when the bundle has no golden set and only the smoke test ran).
    pub golden_items: usize,
    /// Largest probability difference seen against the golden references.
    pub max_abs_diff: f32,
    pub tolerance: Option<f32>,
    /// Largest difference from the quantized graph's packaged CPU outputs; checked only on the CPU provider, for a
    /// bundle that carries them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_max_abs_diff: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_tolerance: Option<f32>,
}

/// The models directory of a node.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
    trusted: TrustedKeys,
    allow_unsigned: bool,
}

impl ModelStore {
    /// `allow_unsigned` exists for development setups only; configuration validation refuses it in production mode.
    pub fn open(dir: impl Into<PathBuf>, trusted: TrustedKeys, allow_unsigned: bool) -> Result<Self, ModelError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self { dir, trusted, allow_unsigned })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a bundle with store id `id` is installed: its directory holds a valid manifest. Its files' hashes are
    /// checked where it is used (`get`, `activate`), not here: the receiver asks this for every announcement it
    /// hears, at every reconnect, and hashing a large bundle each time would hold up the transfer messages behind it.
    pub fn contains(&self, id: &str) -> bool {
        !id.contains(['/', '\\']) && id != ".." && Unopened::read(self.dir.join(id)).is_ok()
    }

    /// The signing key's id, or `None` for an unsigned bundle the store accepts (`allow_unsigned`).
    fn verify(&self, b: &Bundle) -> Result<Option<String>, BundleError> {
        self.judge(b.verify(&self.trusted), &b.label())
    }

    /// The signature check before anything but the manifest is read (see [`bundle::Unopened`]).
    fn verify_first(&self, u: &Unopened) -> Result<(), BundleError> {
        let m = u.manifest();
        self.judge(u.verify(&self.trusted), &format!("{} {}", m.name, m.version)).map(drop)
    }

    fn judge(&self, status: Result<SignatureStatus, BundleError>, label: &str) -> Result<Option<String>, BundleError> {
        match status {
            Ok(SignatureStatus::Verified { key_id }) => Ok(Some(key_id)),
            Ok(SignatureStatus::NotChecked) => Ok(None),
            Err(BundleError::Unsigned) if self.allow_unsigned => {
                tracing::warn!(bundle = %label, "accepting an unsigned bundle (allow_unsigned is set)");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Installs a bundle directory or `.tar` into the store after checking hashes and signature. Does not activate it.
    pub fn install(&self, src: &Path) -> Result<Bundle, ModelError> {
        let meta = std::fs::metadata(src).map_err(io_err(src))?;
        if meta.is_dir() {
            // The signature first: hashing the files of an untrusted directory is work it chooses. (What enters the
            // store is checked again as it is unpacked below: the directory may change meanwhile.)
            self.verify_first(&Unopened::read(src)?)?;
            let b = Bundle::open(src)?;
            let id = bundle_id(&b);
            if self.dir.join(&id).exists() {
                return Err(ModelError::AlreadyInstalled { label: b.label(), id });
            }
            // Re-pack through the archive path: one code path for what enters the store, with all its checks.
            let tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io_err(&self.dir))?;
            bundle::pack_tar(&b, tmp.path())?;
            let f = std::fs::File::open(tmp.path()).map_err(io_err(tmp.path()))?;
            let installed = bundle::unpack_tar_checked(f, &self.dir, |u| self.verify_first(u))?;
            tracing::info!(bundle = %installed.label(), "bundle installed");
            Ok(installed)
        } else {
            let f = std::fs::File::open(src).map_err(io_err(src))?;
            self.install_tar(f)
        }
    }

    /// Installs a bundle archive from any reader (file, HTTP body, MQTT payload).
    pub fn install_tar(&self, archive: impl std::io::Read) -> Result<Bundle, ModelError> {
        self.install_tar_as(archive, None)
    }

    /// [`install_tar`](Self::install_tar) for an archive announced as the bundle `expected` (name, version): one
    /// that holds another, however well signed (another product line, an older version replayed), is refused
    /// before it is unpacked any further than its manifest.
    pub fn install_tar_as(
        &self,
        archive: impl std::io::Read,
        expected: Option<(&str, &str)>,
    ) -> Result<Bundle, ModelError> {
        let first = |u: &Unopened| {
            let m = u.manifest();
            if let Some((name, version)) = expected
                && (m.name != name || m.version.to_string() != version)
            {
                return Err(BundleError::NotAsAnnounced {
                    expected: format!("{name} {version}"),
                    got: format!("{} {}", m.name, m.version),
                });
            }
            self.verify_first(u)
        };
        // Checked in staging: an untrusted bundle never sits where `activate` or `contains` could find it.
        let b = bundle::unpack_tar_checked(archive, &self.dir, first).map_err(|e| match e {
            BundleError::Io { path, source } if source.kind() == std::io::ErrorKind::AlreadyExists => {
                // The path is the store directory the archive's bundle would have gone to.
                let id = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                ModelError::AlreadyInstalled { label: id.clone(), id }
            }
            other => other.into(),
        })?;
        tracing::info!(bundle = %b.label(), "bundle installed");
        Ok(b)
    }

    pub fn state(&self) -> Result<State, ModelError> {
        let path = self.dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ModelError::State { path: path.clone(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(ModelError::Io { path, source }),
        }
    }

    fn write_state(&self, state: &State) -> Result<(), ModelError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| ModelError::State { path: path.clone(), reason: e.to_string() })?;
        // A temporary file of its own: the daemon and an `attrd model` command may write at the same time, and each
        // rename must put a whole file in place.
        let mut tmp =
            tempfile::Builder::new().prefix(".state.json.").tempfile_in(&self.dir).map_err(io_err(&self.dir))?;
        {
            use std::io::Write;
            tmp.write_all(&bytes).map_err(io_err(tmp.path()))?;
            tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
        }
        tmp.persist(&path).map_err(|e| ModelError::Io { path: path.clone(), source: e.error })?;
        Ok(())
    }

    /// Opens and re-verifies an installed bundle by id (`<name>-<version>`).
    pub fn get(&self, id: &str) -> Result<Bundle, ModelError> {
        if id.contains(['/', '\\']) || id.starts_with('.') {
            return Err(ModelError::NotInstalled(id.into()));
        }
        let dir = self.dir.join(id);
        if !dir.is_dir() {
            return Err(ModelError::NotInstalled(id.into()));
        }
        let b = Bundle::open(&dir)?;
        self.verify(&b)?;
        Ok(b)
    }

    /// The active bundle, verified.
    pub fn active(&self) -> Result<Bundle, ModelError> {
        let id = self.state()?.active.ok_or(ModelError::NoneActive)?;
        self.get(&id)
    }

    pub fn list(&self) -> Result<Vec<Installed>, ModelError> {
        let active = self.state()?.active;
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            let id = e.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') || !e.path().is_dir() {
                continue;
            }
            match Bundle::open(e.path()) {
                Ok(b) => out.push(Installed {
                    active: active.as_deref() == Some(id.as_str()),
                    signed_by: self.verify(&b).ok().flatten(),
                    label: b.label(),
                    precision: b.manifest().precision.as_str().into(),
                    id,
                }),
                Err(err) => tracing::warn!(dir = %e.path().display(), error = %err, "not a valid bundle; ignored"),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Loads the bundle on the configured providers, runs its self-test there, and only then records it as active.
    /// Returns the ready engine so a running daemon can swap it in.
    pub fn activate(&self, id: &str, cfg: &EngineConfig) -> Result<(Engine, SelfTestReport), ModelError> {
        self.activate_opened(id, cfg).map(|(_, engine, report)| (engine, report))
    }

    /// [`ModelStore::activate`], also handing back the bundle it opened (and so verified).
    fn activate_opened(&self, id: &str, cfg: &EngineConfig) -> Result<(Bundle, Engine, SelfTestReport), ModelError> {
        let b = self.get(id)?;
        let (engine, report) = load_and_test(&b, cfg)?;
        let mut state = self.state()?;
        if state.active.as_deref() != Some(id) {
            if let Some(old) = state.active.take() {
                state.previous.retain(|p| p != &old);
                state.previous.insert(0, old);
                state.previous.truncate(HISTORY);
            }
            state.previous.retain(|p| p != id);
            state.active = Some(id.to_string());
            self.write_state(&state)?;
        }
        tracing::info!(bundle = %b.label(), provider = %report.provider, "bundle activated");
        Ok((b, engine, report))
    }

    /// Re-activates the most recent previous bundle that is still installed.
    pub fn rollback(&self, cfg: &EngineConfig) -> Result<(String, Engine, SelfTestReport), ModelError> {
        let state = self.state()?;
        let target =
            state.previous.iter().find(|p| self.dir.join(p).is_dir()).cloned().ok_or(ModelError::NoPrevious)?;
        let (engine, report) = self.activate(&target, cfg)?;
        self.demote(state.active)?;
        Ok((target, engine, report))
    }

    /// Activates the most recent previous bundle that is installed and passes its self-test, trying each in turn:
    /// for a box whose active bundle cannot serve any more (a new attrd or ONNX Runtime fails its golden set, a
    /// damaged file). The failing bundle goes to the end of the history. Returns the last failure when none passes.
    pub fn fall_back(&self, cfg: &EngineConfig) -> Result<(Bundle, Engine, SelfTestReport), ModelError> {
        let state = self.state()?;
        let mut last = ModelError::NoPrevious;
        for target in state.previous.iter().filter(|p| self.dir.join(p).is_dir()) {
            match self.activate_opened(target, cfg) {
                Ok(activated) => {
                    self.demote(state.active)?;
                    return Ok(activated);
                }
                Err(e) => {
                    tracing::error!(bundle = %target, error = %crate::util::error_chain(&e), "previous bundle cannot serve either");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Moves `from` (the bundle active before a rollback) to the end of the history: activate() put it first, and a
    /// rollback should not bounce back to it.
    fn demote(&self, from: Option<String>) -> Result<(), ModelError> {
        let Some(from) = from else { return Ok(()) };
        let mut s = self.state()?;
        s.previous.retain(|p| p != &from);
        s.previous.push(from);
        self.write_state(&s)
    }
}

fn bundle_id(b: &Bundle) -> String {
    id_of(&b.manifest().name, &b.manifest().version.to_string())
}

/// The store id (and directory name) of bundle `name` at `version`.
pub fn id_of(name: &str, version: &str) -> String {
    format!("{name}-{version}")
}

/// Loads a bundle and runs its self-test on the providers it actually got.
pub fn load_and_test(b: &Bundle, cfg: &EngineConfig) -> Result<(Engine, SelfTestReport), ModelError> {
    let engine = Engine::load(b, cfg).map_err(|source| ModelError::Engine { label: b.label(), source })?;
    let report = self_test(b, &engine)?;
    Ok((engine, report))
}

/// Runs the bundle's golden set on `engine` and compares the probabilities with the references; without a golden set,
/// runs a smoke test (a mid-grey image must give finite probabilities). NaN outputs fail either way.
pub fn self_test(b: &Bundle, engine: &Engine) -> Result<SelfTestReport, ModelError> {
    let provider = engine.providers().active.to_string();
    let fail = |reason: String| ModelError::SelfTest { label: b.label(), provider: provider.clone(), reason };
    let m = b.manifest();
    let pre = Preprocessor::new(m.input.clone(), Limits::default()).map_err(|e| fail(e.to_string()))?;
    let golden = b.golden()?;
    let Some(set) = golden else {
        let grey = image::RgbImage::from_pixel(m.input.width, m.input.height, image::Rgb([128, 128, 128]));
        let out = engine.infer_blocking(pre.batch(&[pre.to_tensor(&grey)])).map_err(|e| fail(e.to_string()))?;
        for p in out.probabilities(m).iter().flatten() {
            if p.iter().any(|v| !v.is_finite()) {
                return Err(fail("non-finite probabilities on the smoke-test image".into()));
            }
        }
        return Ok(SelfTestReport {
            provider,
            golden_items: 0,
            max_abs_diff: 0.0,
            tolerance: None,
            cpu_max_abs_diff: None,
            cpu_tolerance: None,
        });
    };
    // The packaged CPU outputs bind only the CPU provider: GPU providers run integer kernels of their own. And only
    // on x86, where they are packaged (`trainer package`) and where ORT's integer kernels were measured to agree
    // across CPUs. ARM's kernels are another family: they agree among ARM cores but differ from x86 by up to 0.08
    // (scripts/check-int8-arm), so there only the fp32 references apply.
    let cpu_check =
        set.cpu_tolerance.filter(|_| engine.providers().active == Provider::Cpu && cfg!(target_arch = "x86_64"));
    let mut max_diff = 0f32;
    let mut cpu_max_diff = 0f32;
    for chunk in set.items.chunks(16) {
        let tensors = chunk
            .iter()
            .map(|item| {
                let bytes = b.read_golden_image(item).map_err(|e| fail(format!("golden image: {e}")))?;
                pre.prepare(&bytes).map_err(|e| fail(format!("golden image {}: {e}", item.file)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = engine.infer_blocking(pre.batch(&tensors)).map_err(|e| fail(e.to_string()))?;
        for (item, probs) in chunk.iter().zip(out.probabilities(m)) {
            for (head, p) in m.heads.iter().zip(&probs) {
                // The packaged CPU result first: when both fail, "this CPU computes something else" is the cause.
                if let (Some(tolerance), Some(cpu)) = (cpu_check, &item.cpu_probabilities) {
                    let want = &cpu[&head.name];
                    let d = max_abs_diff(p, want);
                    if !d.is_finite() || d > tolerance {
                        return Err(fail(format!(
                            "{} head {:?}: this CPU's INT8 result differs by {d} from the packaged CPU result \
                             (cpu_tolerance {tolerance}); {}. Its integer kernels compute something else, as a \
                             bundle quantized with --weight-range full does on an x86 CPU without VNNI",
                            item.file,
                            head.name,
                            top1_vs(head, p, want)
                        )));
                    }
                    cpu_max_diff = cpu_max_diff.max(d);
                }
                let want = &item.probabilities[&head.name];
                let d = max_abs_diff(p, want);
                if !d.is_finite() || d > set.tolerance {
                    return Err(fail(format!(
                        "{} head {:?}: probabilities differ by {d} (tolerance {}); {}",
                        item.file,
                        head.name,
                        set.tolerance,
                        top1_vs(head, p, want)
                    )));
                }
                max_diff = max_diff.max(d);
            }
        }
    }
    Ok(SelfTestReport {
        provider,
        golden_items: set.items.len(),
        max_abs_diff: max_diff,
        tolerance: Some(set.tolerance),
        cpu_max_abs_diff: cpu_check.map(|_| cpu_max_diff),
        cpu_tolerance: cpu_check,
    })
}

/// Largest absolute difference of two probability vectors (over their common length); NaN when either holds a NaN
/// (`f32::max` would drop it, and a model that outputs NaN must fail its self-test).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, |m, d| if m.is_nan() || d.is_nan() { f32::NAN } else { m.max(d) })
}

/// "top-1 X vs reference Y", for a failure message.
fn top1_vs(head: &bundle::Head, got: &[f32], want: &[f32]) -> String {
    let got = postprocess::top_k_indices(got, 1)[0];
    let want = postprocess::top_k_indices(want, 1)[0];
    format!("top-1 {:?} vs reference {:?}", head.classes[got], head.classes[want])
}

#[cfg(test)]
mod tests {
    use super::max_abs_diff;

    #[test]
    fn a_nan_probability_is_never_within_tolerance() {
        assert_eq!(max_abs_diff(&[0.5, 0.25], &[0.25, 0.5]), 0.25);
        assert!(max_abs_diff(&[f32::NAN, 0.5], &[0.5, 0.5]).is_nan());
        assert!(max_abs_diff(&[0.5, f32::NAN], &[0.5, 0.5]).is_nan());
        assert!(max_abs_diff(&[0.5, 0.5], &[0.5, f32::NAN]).is_nan());
        assert!(max_abs_diff(&[f32::NAN, 0.5, 0.0], &[0.5, 0.0, 0.5]).is_nan(), "a later difference keeps the NaN");
    }
}
