# Sourced by the scripts/bench-* drivers: builds the `cargo bench` target $1 (release) and prints the path of its
# executable. Compiler errors go to stderr as usual; stdout carries only the path.
bench_exe() {
    cargo bench --quiet --bench "$1" --no-run --message-format json-render-diagnostics \
        | .venv/bin/python -c 'import json, sys
name = sys.argv[1]
for line in sys.stdin:
    v = json.loads(line)
    if v.get("reason") == "compiler-artifact" and v.get("target", {}).get("name") == name and v.get("executable"):
        print(v["executable"])' "$1"
}
