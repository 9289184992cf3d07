# Sourced by the GPU check scripts: puts the ONNX Runtime GPU build ($1: its libonnxruntime.so) and the CUDA/cuDNN
# libraries of the machine's NVIDIA pip packages (as PyTorch installs them) on LD_LIBRARY_PATH.
gpu_env() {
    local ort_lib=$1 nv_libs
    nv_libs=$(python3 - <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})
print(":".join(dirs))
PY
)
    export LD_LIBRARY_PATH="$(dirname "$ort_lib"):$nv_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
