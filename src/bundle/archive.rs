//! The `.tar` form of a bundle, for shipping over USB sticks, HTTP and MQTT.
//!
//! Archives come from outside the box, so unpacking trusts nothing: only plain files and directories, no absolute
//! paths, no `..`, no links or devices, bounded size and entry count, and the result must open as a valid bundle
//! before it is moved into place.

use super::{Bundle, BundleError, GOLDEN_DIR, MANIFEST_FILE, Unopened, io_err, is_known_top_level};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Largest total of file sizes an archive may unpack to.
pub const MAX_BUNDLE_BYTES: u64 = 1 << 30;
const MAX_ENTRIES: usize = 10_000;
const MAX_DEPTH: usize = 3;

/// Writes the bundle as a tar with every file under `<name>-<version>/`, in a stable order with fixed metadata so
/// the same bundle always gives the same bytes.
pub fn pack_tar(bundle: &Bundle, out: &Path) -> Result<(), BundleError> {
    let prefix = format!("{}-{}", bundle.manifest().name, bundle.manifest().version);
    let tmp = out.with_extension("tar.partial");
    let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    let mut files = Vec::new();
    collect_files(bundle.dir(), Path::new(""), &mut files)?;
    files.sort();
    for rel in files {
        let src = bundle.dir().join(&rel);
        let mut f = std::fs::File::open(&src).map_err(io_err(&src))?;
        let len = f.metadata().map_err(io_err(&src))?.len();
        let mut header = tar::Header::new_gnu();
        header.set_size(len);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, Path::new(&prefix).join(&rel), &mut f).map_err(io_err(&src))?;
    }
    let w = builder.into_inner().map_err(io_err(&tmp))?;
    w.into_inner()
        .map_err(|e| BundleError::Io { path: tmp.clone(), source: e.into_error() })?
        .sync_all()
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io_err(out))
}

fn collect_files(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), BundleError> {
    let dir = root.join(rel);
    for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        let ty = entry.file_type().map_err(io_err(&entry.path()))?;
        let child = rel.join(entry.file_name());
        if ty.is_dir() {
            collect_files(root, &child, out)?;
        } else if ty.is_file() {
            out.push(child);
        }
    }
    Ok(())
}

/// Unpacks a bundle archive into `models_dir/<name>-<version>/` and returns the opened bundle. Nothing is left behind
/// on failure, and an existing bundle of the same name and version is never overwritten.
pub fn unpack_tar(archive: impl Read, models_dir: &Path) -> Result<Bundle, BundleError> {
    unpack_tar_checked(archive, models_dir, |_| Ok(()))
}

/// [`unpack_tar`], with `accept` (a signature check, say) run while the bundle is still in the staging directory,
/// on its manifest alone, before any other file is read or hashed: a bundle it refuses never appears under its
/// final name, not even for a moment a crash could freeze, and an untrusted archive costs no more than its unpacking.
///
/// Once accepted, every file and directory is on disk (fsynced) before the bundle takes its final name, and that
/// name is too, before this returns: a store whose state file names the bundle after a power cut finds it whole.
pub fn unpack_tar_checked(
    archive: impl Read,
    models_dir: &Path,
    accept: impl FnOnce(&Unopened) -> Result<(), BundleError>,
) -> Result<Bundle, BundleError> {
    std::fs::create_dir_all(models_dir).map_err(io_err(models_dir))?;
    let staging = tempfile::Builder::new().prefix(".unpack-").tempdir_in(models_dir).map_err(io_err(models_dir))?;
    let mut ar = tar::Archive::new(archive);
    let mut total: u64 = 0;
    let entries = ar.entries().map_err(|e| BundleError::Archive(format!("not a tar archive: {e}")))?;
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ENTRIES {
            return Err(BundleError::Archive(format!("more than {MAX_ENTRIES} entries")));
        }
        let mut entry = entry.map_err(|e| BundleError::Archive(format!("corrupt tar entry: {e}")))?;
        let path = entry.path().map_err(|e| BundleError::Archive(format!("bad entry name: {e}")))?.into_owned();
        let rel = safe_relative(&path)?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(staging.path().join(&rel)).map_err(io_err(staging.path()))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                total = total.saturating_add(entry.size());
                if total > MAX_BUNDLE_BYTES {
                    return Err(BundleError::Archive(format!("unpacks to more than {MAX_BUNDLE_BYTES} bytes")));
                }
                let dest = staging.path().join(&rel);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .map_err(|e| BundleError::Archive(format!("{}: {e} (duplicate entry?)", path.display())))?;
                // The header's size is what we budgeted; never copy more than that.
                let limit = entry.size();
                let copied = std::io::copy(&mut (&mut entry).take(limit), &mut f)
                    .map_err(|e| BundleError::Archive(format!("{}: truncated archive: {e}", path.display())))?;
                if copied != limit {
                    return Err(BundleError::Archive(format!("{}: truncated archive", path.display())));
                }
            }
            // pax/GNU long-name headers are consumed by the tar crate; anything else (links, devices, fifos) is refused.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(BundleError::Archive(format!(
                    "{}: entry type {other:?} is not allowed (only files and directories)",
                    path.display()
                )));
            }
        }
    }
    let root = find_root(staging.path())?;
    check_contents(&root)?;
    accept(&Unopened::read(&root)?)?;
    let bundle = Bundle::open(&root)?;
    sync_dirs(staging.path())?;
    let final_dir = models_dir.join(format!("{}-{}", bundle.manifest().name, bundle.manifest().version));
    if final_dir.exists() {
        return Err(BundleError::Io {
            path: final_dir,
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "this bundle version is already installed"),
        });
    }
    std::fs::rename(&root, &final_dir).map_err(io_err(&final_dir))?;
    sync_dir(models_dir)?;
    Bundle::open(&final_dir)
}

/// Fsyncs every file under `dir`, then the directories, so the files and their names are on disk. Only for a
/// bundle that passed its checks: forcing an untrusted archive's bytes to flash would be wear an attacker chooses.
fn sync_dirs(dir: &Path) -> Result<(), BundleError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        if entry.file_type().map_err(io_err(dir))?.is_dir() {
            sync_dirs(&path)?;
        } else {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io_err(&path))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn safe_relative(path: &Path) -> Result<PathBuf, BundleError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(BundleError::Archive(format!(
                    "entry {:?} escapes the bundle (absolute path or '..')",
                    path.display()
                )));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(BundleError::Archive("entry with an empty name".into()));
    }
    if out.components().count() > MAX_DEPTH {
        return Err(BundleError::Archive(format!("entry {:?} is nested too deeply", path.display())));
    }
    Ok(out)
}

/// The bundle is either at the archive's top level or in its single top-level directory.
fn find_root(staging: &Path) -> Result<PathBuf, BundleError> {
    if staging.join(MANIFEST_FILE).is_file() {
        return Ok(staging.to_path_buf());
    }
    let entries: Vec<_> =
        std::fs::read_dir(staging).map_err(io_err(staging))?.collect::<Result<_, _>>().map_err(io_err(staging))?;
    match entries.as_slice() {
        [only] if only.path().join(MANIFEST_FILE).is_file() => Ok(only.path()),
        _ => Err(BundleError::Archive(format!("no {MANIFEST_FILE} at the top level or in a single top directory"))),
    }
}

fn check_contents(root: &Path) -> Result<(), BundleError> {
    for entry in std::fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().map_err(io_err(&entry.path()))?.is_dir();
        if !is_known_top_level(&name) || (is_dir && name != GOLDEN_DIR) {
            return Err(BundleError::Archive(format!("unexpected entry {name:?} in bundle")));
        }
    }
    Ok(())
}
