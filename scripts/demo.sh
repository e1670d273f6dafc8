#!/usr/bin/env bash
# make demo: build a small RAFS image from a generated directory, serve it
# with bin/rafsd over FUSE from a local blob dir, list and read it, show the
# daemon's metrics through its API socket, then unmount and clean up (on any
# failure too). Needs root (FUSE mount).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
work=$(mktemp -d /tmp/rafsd-demo.XXXXXX)
pid=""
cleanup() {
  rc=$?
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  umount -l "$work/mnt" 2>/dev/null || true
  rm -rf "$work"
  if ((rc)); then echo "demo FAILED (exit $rc)" >&2; fi
  exit $rc
}
trap cleanup EXIT INT TERM

echo "== generating a source tree in $work/src"
mkdir -p "$work/src/etc" "$work/src/usr/share/doc" "$work/blobs" "$work/mnt"
echo "hello from a lazily loaded RAFS image" > "$work/src/hello.txt"
printf 'NAME=rafsd-demo\nVERSION=1\n' > "$work/src/etc/os-release"
head -c $((5 * 1024 * 1024)) /dev/urandom > "$work/src/usr/share/doc/big.bin"
ln -s ../hello.txt "$work/src/etc/hello-link"

echo "== building the image (rafs-image create)"
"$BIN/rafs-image" create --bootstrap "$work/bootstrap" --blob-dir "$work/blobs" "$work/src"
ls -l "$work/blobs"

cat > "$work/config.json" <<JSON
{"device":{"backend":{"type":"localfs","config":{"dir":"$work/blobs"}},
 "cache":{"type":"blobcache","config":{"work_dir":"$work/cache"}}},
 "mode":"direct","digest_validate":true}
JSON

echo "== starting rafsd (FUSE) on $work/mnt"
"$BIN/rafsd" fuse --config "$work/config.json" --bootstrap "$work/bootstrap" \
  --mountpoint "$work/mnt" --apisock "$work/api.sock" --thread-num 2 --log-level info \
  2> "$work/rafsd.log" &
pid=$!
for _ in $(seq 100); do
  if curl -sf --unix-socket "$work/api.sock" http://rafsd/api/v1/daemon 2>/dev/null | grep -q RUNNING; then break; fi
  sleep 0.1
done
curl -sf --unix-socket "$work/api.sock" http://rafsd/api/v1/daemon; echo

echo "== listing the mount"
ls -lR "$work/mnt"
echo "== reading files"
cat "$work/mnt/hello.txt" "$work/mnt/etc/os-release"
cmp "$work/mnt/usr/share/doc/big.bin" "$work/src/usr/share/doc/big.bin"
echo "big.bin: identical to the source ($(stat -c %s "$work/mnt/usr/share/doc/big.bin") bytes)"
readlink "$work/mnt/etc/hello-link"

echo "== metrics (curl --unix-socket $work/api.sock)"
curl -sf --unix-socket "$work/api.sock" http://rafsd/api/v1/metrics; echo
curl -sf --unix-socket "$work/api.sock" http://rafsd/api/v1/metrics/backend; echo
prom=$(curl -sf --unix-socket "$work/api.sock" http://rafsd/metrics)
grep '^rafsd_' <<<"$prom" | grep -v _bucket || true

echo "== stopping rafsd (SIGTERM unmounts)"
kill -TERM "$pid"
wait "$pid"
pid=""
if grep -q " $work/mnt " /proc/self/mounts; then echo "mount left behind" >&2; exit 1; fi
echo "demo OK"
