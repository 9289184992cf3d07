# Emulated aarch64 for the scripts/check-*-arm scripts: fetched into .deps/arm on first use (registries only, root
# for apt), nothing installed for arm64.
#   - qemu-user 10 from Debian bookworm-backports (12's qemu 7.2 crashes importing ONNX Runtime's aarch64 wheel);
#   - an aarch64 CPython 3.11 from Debian's arm64 packages, unpacked as a sysroot;
#   - aarch64 wheels from PyPI, unpacked into a site directory per set of requirements.
# Sourced from the repository root; sets ARM, QEMU and SYSROOT.
ARM=.deps/arm
mkdir -p "$ARM"

QEMU=$ARM/qemu/usr/bin/qemu-aarch64
if [[ ! -x $QEMU ]]; then
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            > /etc/apt/sources.list.d/attrd-backports.sources
        apt-get update -qq
    fi
    (cd "$ARM" && apt-get download -qq qemu-user/bookworm-backports 2>/dev/null && dpkg -x qemu-user_*.deb qemu && rm qemu-user_*.deb)
fi
SYSROOT=$ARM/sysroot
if [[ ! -x $SYSROOT/usr/bin/python3.11 ]]; then
    dpkg --print-foreign-architectures | grep -q arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
    mkdir -p "$ARM/debs"
    for p in python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libffi8 libssl3 \
        libbz2-1.0 liblzma5 libgcc-s1 libstdc++6 libsqlite3-0 libuuid1 libcrypt1 libtinfo6 libncursesw6 libreadline8; do
        (cd "$ARM/debs" && apt-get download -qq "$p:arm64" 2>/dev/null)
    done
    for d in "$ARM"/debs/*.deb; do dpkg -x "$d" "$SYSROOT"; done
    rm -rf "$ARM/debs"
fi

# arm_site DIR REQUIREMENT...: the aarch64 CPython 3.11 wheels of REQUIREMENT... unpacked into DIR (once).
arm_site() {
    local site=$1
    shift
    [[ -d $site ]] && return 0
    rm -rf "$ARM/wheels"
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        -d "$ARM/wheels" "$@"
    for w in "$ARM"/wheels/*.whl; do .venv/bin/python -m zipfile -e "$w" "$site.tmp"; done
    mv "$site.tmp" "$site"
    rm -rf "$ARM/wheels"
}

# arm_python CPU ARGS...: the aarch64 CPython on an emulated CPU (PYTHONPATH as the caller sets it).
arm_python() {
    local cpu=$1
    shift
    "$QEMU" -cpu "$cpu" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "$@" 2> >(grep -v cpuid_info >&2)
}
