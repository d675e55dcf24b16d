#!/usr/bin/env bash
# The project's test command (the README's second command): every test of the workspace on the
# CPU, doc examples included.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets
cargo test --workspace --doc
