#!/usr/bin/env bash
# The whole test suite: formatting, lints, Rust unit and integration tests
# (real daemons on port 0 and as processes), then the wire contract proven
# by clients nobody here wrote (Python websockets, headless Chromium)
# against the real binaries.
#
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== cargo build (binaries used by process tests)"
cargo build --workspace --bins --quiet

echo "== cargo test"
cargo test --workspace --quiet 2>&1 | tee target/cargo-test.log | grep -E "^test result|FAILED|panicked" || true
if grep -qE "FAILED|error: test failed|error\[" target/cargo-test.log; then
  echo "cargo test failed; see target/cargo-test.log"
  exit 1
fi

echo "== external clients against the real binaries"
scripts/test-external.sh

echo "== the README's demo command (debug build, other ports, stops by itself)"
python3 tests/demo_smoke.py

echo "== deploy files (systemd, docker, kubernetes, example configs)"
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pyyaml
python3 tests/deploy/check_deploy.py > target/deploy-check.log || { cat target/deploy-check.log; exit 1; }
tail -n 1 target/deploy-check.log

echo "== every command in README.md and docs/*.md (run against local clusters, or shape-checked)"
python3 tests/docs/check_doc_commands.py > target/doc-commands.log || { cat target/doc-commands.log; exit 1; }
tail -n 1 target/doc-commands.log

echo "== multi-host cluster in network namespaces"
tests/multihost/run.sh
