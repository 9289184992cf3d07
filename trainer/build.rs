//! Build script for the `torch` feature: makes binaries and test executables find libtorch at run time.
//!
//! torch-sys links `libtorch_cpu.so` and friends from the PyPI torch wheel, but the wheel's `torch/lib` is not on the
//! loader's search path, so without help every test binary dies with "libtorch_cpu.so: cannot open shared object
//! file" unless the user exports `LD_LIBRARY_PATH`. We bake that directory into our own executables as an rpath
//! instead. (libtorch's own libraries carry `$ORIGIN`-relative rpaths for their dependencies, so one entry suffices.)
//!
//! Where libtorch lives is resolved the way torch-sys resolves it: `LIBTORCH_USE_PYTORCH` → ask Python (here the
//! interpreter named by `PYTHON_SYS_EXECUTABLE`, which `.cargo/config.toml` points at the project venv); otherwise
//! `LIBTORCH_LIB` or `LIBTORCH/lib`; otherwise Python again.
//!
//! `ATTRD_TORCH_CUDA=1` additionally force-links `libtorch_cuda.so`. Nothing in our code references a symbol from it
//! (CUDA kernels register themselves from static initialisers), so with the default `--as-needed` the linker drops it
//! and `tch::Cuda::is_available()` is false even on a GPU machine (tch-rs issue 980).

use std::env;
use std::error::Error;
use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    // Cargo reruns build scripts when the feature set changes, so CARGO_FEATURE_TORCH needs no rerun line.
    if env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return Ok(());
    }
    for var in
        ["ATTRD_TORCH_CUDA", "LIBTORCH", "LIBTORCH_LIB", "LIBTORCH_USE_PYTORCH", "PYTHON_SYS_EXECUTABLE", "VIRTUAL_ENV"]
    {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let lib_dir = libtorch_lib_dir()?;
    if !lib_dir.join("libtorch_cpu.so").exists() && !lib_dir.join("libtorch_cpu.dylib").exists() {
        return Err(
            format!("no libtorch_cpu in {} (is torch installed for that interpreter?)", lib_dir.display()).into()
        );
    }
    let lib = lib_dir.to_str().ok_or_else(|| format!("libtorch directory {} is not UTF-8", lib_dir.display()))?;
    // `-Wl,` splits its argument on commas, so such a path would silently become garbage linker flags.
    if lib.contains(',') {
        return Err(format!("libtorch directory {lib:?} contains a comma, which cannot be passed through -Wl").into());
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");

    if env::var("ATTRD_TORCH_CUDA").is_ok_and(|v| v == "1") {
        if !lib_dir.join("libtorch_cuda.so").exists() {
            // Asked for CUDA explicitly: silently producing a CPU-only binary would only surface on the GPU machine.
            return Err(format!("ATTRD_TORCH_CUDA=1 but {} has no libtorch_cuda.so (CPU-only libtorch?)", lib).into());
        }
        println!("cargo:rustc-link-search=native={lib}");
        // One argument so the order survives: --no-as-needed must be in effect exactly while -ltorch_cuda is read.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    Ok(())
}

fn libtorch_lib_dir() -> Result<PathBuf, Box<dyn Error>> {
    if env::var_os("LIBTORCH_USE_PYTORCH").is_none() {
        if let Some(lib) = env::var_os("LIBTORCH_LIB") {
            return Ok(PathBuf::from(lib).join("lib"));
        }
        if let Some(root) = env::var_os("LIBTORCH") {
            return Ok(PathBuf::from(root).join("lib"));
        }
    }
    let python = env::var_os("PYTHON_SYS_EXECUTABLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(if env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" }));
    let out = Command::new(&python)
        .args(["-c", "import os, torch; print(os.path.join(torch.__path__[0], 'lib'))"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} could not locate torch ({}): {}",
            python.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let dir = String::from_utf8(out.stdout)?;
    Ok(PathBuf::from(dir.trim()))
}
