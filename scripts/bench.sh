#!/usr/bin/env bash
# Benchmark nbdcrypt against other NBD servers on the same blocks.
#
# Servers, in two cache modes:
#   none:      nbdcrypt --cache none, qemu-nbd raw --cache=none --aio=io_uring (by --offset
#              on the nbdcrypt volume's data area), qemu-nbd with qemu's LUKS driver on a
#              LUKS1 image of its own (--cache=none --aio=io_uring)
#   writeback: nbdcrypt --cache writeback, qemu-nbd raw --cache=writeback, nbdkit's file
#              plugin and nbd-server (both on a loop device made with `losetup -o` over the
#              data area)
# Workloads, each run with fio's nbd engine (one connection): sequential read and write
# 1 MiB at queue depth 16, random read and write 4 KiB at queue depth 32, mixed 70/30
# random 4 KiB at queue depth 32; then nbdcopy out (export to null:) and in (file to
# export). After each write workload one NBD FLUSH is timed.
#
# Servers run one after another in each repetition, so every server sees the same
# conditions in turn; the table gives medians over repetitions and the spread.
# Storage: a loop device over a /dev/shm file (the servers' own cost, no disk stalls) and
# a loop device over a file on disk (what users see). Loop devices use direct I/O to their
# backing file.
#
# Usage: scripts/bench.sh [--smoke] [--out DIR]
#   --smoke   a tiny run (64 MiB, 1 s per workload, one repetition, /dev/shm only) that
#             checks the script and every server start, not speed
# Environment: SIZE (data area, default 1G), RUNTIME (seconds per fio job, default 3),
#   REPS (repetitions on /dev/shm, default 3), DISK_REPS (on disk, default 2),
#   STORAGES ("shm disk"), DISK_DIR (default /var/tmp/nbdcrypt-bench), SERVERS and
#   DISK_SERVERS (the servers run on /dev/shm and on disk; the disk run leaves out the
#   LUKS1 peer, measured on /dev/shm, and two writeback peers, to fit in 15 minutes).
# Needs root (losetup), fio, qemu-nbd, qemu-img, nbdkit, nbd-server, nbdcopy, nbdsh, jq,
# python3 and a release build (cargo build --release).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/target/release/nbdcrypt}

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-3}
REPS=${REPS:-3}
DISK_REPS=${DISK_REPS:-2}
STORAGES=${STORAGES:-shm disk}
DISK_DIR=${DISK_DIR:-/var/tmp/nbdcrypt-bench}
SERVERS=${SERVERS:-nbdcrypt-none qemu-raw-none qemu-luks-none nbdcrypt-writeback qemu-raw-writeback nbdkit-writeback nbd-server-writeback}
DISK_SERVERS=${DISK_SERVERS:-nbdcrypt-none qemu-raw-none nbdcrypt-writeback qemu-raw-writeback}
OUT=$ROOT/target/bench
WORKLOADS="seqread seqwrite randread randwrite randrw copyout copyin"

while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) SIZE=64M RUNTIME=1 REPS=1 STORAGES=shm; shift ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "bench.sh: unknown argument $1 (expected --smoke or --out DIR)" >&2; exit 2 ;;
  esac
done

# nbdcrypt's LUKS2 data area starts 16 MiB into the volume.
readonly DATA_OFFSET=$((16 * 1024 * 1024))
readonly LUKS_PASSPHRASE=nbdcrypt-bench
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
# nbdsh needs Debian's python3 (python3-libnbd), which may not be first on PATH.
NBDSH=(/usr/bin/python3 -m nbd)
CLK_TCK=$(getconf CLK_TCK)

for tool in fio qemu-nbd qemu-img nbdkit nbd-server nbdcopy nbdsh jq python3 losetup; do
  command -v "$tool" >/dev/null || { echo "bench.sh: $tool not found; run scripts/install-deps.sh" >&2; exit 1; }
done
[[ -x $BIN ]] || { echo "bench.sh: $BIN missing; run cargo build --release" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "bench.sh: needs root for losetup" >&2; exit 1; }

mkdir -p "$OUT"
RESULTS=$OUT/results.tsv
SESSIONS=$OUT/sessions.tsv
printf 'storage\tserver\tmode\tworkload\trep\tmb_s\tiops\tp99_us\tcpu_s\tgib\tflush_s\n' >"$RESULTS"
printf 'storage\tserver\trep\tpeak_rss_kib\n' >"$SESSIONS"

LOOPS=()
SERVER_PID=
WORK=

cleanup() {
  stop_server || true
  for loop in "${LOOPS[@]}"; do losetup -d "$loop" 2>/dev/null || true; done
  [[ -n $WORK ]] && rm -rf "$WORK"
  rm -rf /dev/shm/nbdcrypt-bench
}
trap cleanup EXIT

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

# Attaches a loop device over FILE and stores its path in LOOP (not echoed: a command
# substitution would run in a subshell and lose the LOOPS entry that cleanup detaches).
new_loop() { # FILE [losetup options...]
  local file=$1; shift
  LOOP=$(losetup -f --show --direct-io=on "$@" "$file")
  LOOPS+=("$LOOP")
}

# CPU seconds (user + system, with reaped children) of process $1.
cpu_seconds() {
  awk -v tck="$CLK_TCK" '{ sub(/^.*\) /, ""); printf "%.3f\n", ($12 + $13 + $14 + $15) / tck }' "/proc/$1/stat"
}

wait_for_socket() {
  for _ in $(seq 100); do
    [[ -S $1 ]] && return 0
    sleep 0.1
  done
  echo "bench.sh: no server socket at $1 after 10 s" >&2
  return 1
}

start_server() { # SERVER
  local server=$1 sock=$WORK/nbd.sock
  rm -f "$sock"
  case $server in
    nbdcrypt-none | nbdcrypt-writeback)
      NBDCRYPT_KEYSTORE=$WORK/keys "$BIN" serve --log warn --unix "$sock" --name vol \
        --cache "${server#nbdcrypt-}" "$VOLUME" &
      SERVER_PID=$! ;;
    qemu-raw-none)
      qemu-nbd -f raw --offset=$DATA_OFFSET --cache=none --aio=io_uring -t -e 8 -x vol -k "$sock" "$VOLUME" &
      SERVER_PID=$! ;;
    qemu-raw-writeback)
      qemu-nbd -f raw --offset=$DATA_OFFSET --cache=writeback --aio=threads -t -e 8 -x vol -k "$sock" "$VOLUME" &
      SERVER_PID=$! ;;
    qemu-luks-none)
      qemu-nbd --object "secret,id=sec0,data=$LUKS_PASSPHRASE" --cache=none --aio=io_uring -t -e 8 -x vol \
        -k "$sock" --image-opts "driver=luks,key-secret=sec0,file.driver=host_device,file.filename=$LUKS_DEVICE" &
      SERVER_PID=$! ;;
    nbdkit-writeback)
      nbdkit -f -U "$sock" file "file=$DATA_DEVICE" &
      SERVER_PID=$! ;;
    nbd-server-writeback)
      cat >"$WORK/nbd-server.conf" <<EOF
[generic]
unixsock = $sock
[vol]
exportname = $DATA_DEVICE
flush = true
fua = true
EOF
      nbd-server -C "$WORK/nbd-server.conf" -p "$WORK/nbd-server.pid"
      wait_for_socket "$sock"
      SERVER_PID=$(cat "$WORK/nbd-server.pid") ;;
    *) echo "bench.sh: unknown server $server" >&2; exit 2 ;;
  esac
  wait_for_socket "$sock"
  URI="nbd+unix:///vol?socket=$sock"
}

stop_server() {
  [[ -n $SERVER_PID ]] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

peak_rss_kib() {
  awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

fio_args() { # WORKLOAD
  # No ramp time: the server's CPU time is sampled around the whole fio run, so every
  # byte moved must count too.
  local common=(--name=job --ioengine=nbd "--uri=$URI" --time_based "--runtime=$RUNTIME"
    --size="$SIZE_BYTES" --output-format=json --norandommap --randrepeat=0)
  case $1 in
    seqread) echo "${common[@]}" --rw=read --bs=1M --iodepth=16 ;;
    seqwrite) echo "${common[@]}" --rw=write --bs=1M --iodepth=16 ;;
    randread) echo "${common[@]}" --rw=randread --bs=4k --iodepth=32 ;;
    randwrite) echo "${common[@]}" --rw=randwrite --bs=4k --iodepth=32 ;;
    randrw) echo "${common[@]}" --rw=randrw --rwmixread=70 --bs=4k --iodepth=32 ;;
  esac
}

# Seconds one NBD FLUSH takes after a write workload (the dirty data a buffered server
# still has to write), timed inside nbdsh so its start-up does not count.
time_flush() {
  "${NBDSH[@]}" -u "$URI" -c 'import time; start = time.monotonic(); h.flush(); print(f"{time.monotonic() - start:.3f}")'
}

run_workload() { # STORAGE SERVER MODE WORKLOAD REP
  local storage=$1 server=$2 mode=$3 workload=$4 rep=$5
  local cpu_before cpu_after mb_s iops p99 gib flush=-
  cpu_before=$(cpu_seconds "$SERVER_PID")
  case $workload in
    copyout | copyin)
      local start end
      start=$(date +%s.%N)
      if [[ $workload == copyout ]]; then
        nbdcopy --no-extents "$URI" null:
      else
        nbdcopy "$SOURCE" "$URI"
      fi
      end=$(date +%s.%N)
      mb_s=$(echo "$SIZE_BYTES / ($end - $start) / 1000000" | bc -l)
      iops=-
      p99=-
      gib=$(echo "$SIZE_BYTES / 1073741824" | bc -l) ;;
    *)
      local json
      # shellcheck disable=SC2046
      fio $(fio_args "$workload") --output="$WORK/fio.json" >/dev/null
      json=$(<"$WORK/fio.json")
      mb_s=$(jq '(.jobs[0].read.bw_bytes + .jobs[0].write.bw_bytes) / 1000000' <<<"$json")
      iops=$(jq '.jobs[0].read.iops + .jobs[0].write.iops' <<<"$json")
      # p99 completion latency of the direction that moved the most I/Os.
      p99=$(jq '[.jobs[0].read, .jobs[0].write] | max_by(.total_ios) | .clat_ns.percentile["99.000000"] / 1000' <<<"$json")
      gib=$(jq '(.jobs[0].read.io_bytes + .jobs[0].write.io_bytes) / 1073741824' <<<"$json")
      case $workload in seqwrite | randwrite | randrw) flush=$(time_flush) ;; esac ;;
  esac
  sleep 0.2 # let a forking server reap its connection's child
  cpu_after=$(cpu_seconds "$SERVER_PID")
  local cpu
  cpu=$(echo "$cpu_after - $cpu_before" | bc -l)
  printf '%s\t%s\t%s\t%s\t%s\t%.1f\t%s\t%s\t%.3f\t%.3f\t%s\n' "$storage" "$server" "$mode" "$workload" "$rep" \
    "$mb_s" "$iops" "$p99" "$cpu" "$gib" "$flush" >>"$RESULTS"
}

# Lays out the volumes on STORAGE: the nbdcrypt volume (also served raw by offset) and
# the LUKS1 image, both filled with data so reads decrypt real ciphertext.
prepare_storage() { # STORAGE
  local storage=$1 dir
  case $storage in
    shm) dir=/dev/shm/nbdcrypt-bench/$storage ;;
    disk) dir=$DISK_DIR ;;
  esac
  rm -rf "$dir"
  mkdir -p "$dir"
  STORE_DIR=$dir
  NBDCRYPT_KEYSTORE=$WORK/keys "$BIN" create --log warn --size "$SIZE" "$dir/vol.img" >/dev/null
  qemu-img create -q -f luks --object "secret,id=sec0,data=$LUKS_PASSPHRASE" \
    -o key-secret=sec0,iter-time=10 "$dir/luks1.img" "$SIZE"
  new_loop "$dir/vol.img"
  VOLUME=$LOOP
  new_loop "$dir/vol.img" -o $DATA_OFFSET --sizelimit "$SIZE_BYTES"
  DATA_DEVICE=$LOOP
  new_loop "$dir/luks1.img"
  LUKS_DEVICE=$LOOP
  log "$storage: volume $VOLUME, data area $DATA_DEVICE, LUKS1 image $LUKS_DEVICE"

  start_server nbdcrypt-none
  nbdcopy "$SOURCE" "$URI"
  stop_server
  start_server qemu-luks-none
  nbdcopy "$SOURCE" "$URI"
  stop_server
}

release_storage() {
  for loop in "${LOOPS[@]}"; do losetup -d "$loop" 2>/dev/null || true; done
  LOOPS=()
  rm -rf "$STORE_DIR"
}

mode_of() {
  case $1 in *-none) echo none ;; *) echo writeback ;; esac
}

# Prints the Markdown tables: medians per server and workload, the spread between
# repetitions, and the ratios that the targets are stated in.
report() {
  python3 - "$1" <<'PY'
import csv, statistics, sys
from collections import defaultdict

out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/results.tsv"), delimiter="\t"))
sessions = list(csv.DictReader(open(f"{out}/sessions.tsv"), delimiter="\t"))
workloads = ["seqread", "seqwrite", "randread", "randwrite", "randrw", "copyout", "copyin"]
peers = {"none": ["qemu-raw-none"], "writeback": ["qemu-raw-writeback", "nbdkit-writeback", "nbd-server-writeback"]}

def num(value):
    return None if value in ("-", "", None) else float(value)

cells = defaultdict(list)
for row in rows:
    cells[(row["storage"], row["server"], row["workload"])].append(row)

def median(key, field):
    values = [num(r[field]) for r in cells.get(key, []) if num(r[field]) is not None]
    return statistics.median(values) if values else None

def cpu_per_gib(key):
    pairs = [(num(r["cpu_s"]), num(r["gib"])) for r in cells.get(key, [])]
    values = [c / g for c, g in pairs if c is not None and g]
    return statistics.median(values) if values else None

def spread(key):
    values = [num(r["mb_s"]) for r in cells.get(key, [])]
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values) * 100

def fmt(value, digits=0):
    return "-" if value is None else f"{value:.{digits}f}"

print(open(f"{out}/machine.txt").read())
for storage in dict.fromkeys(r["storage"] for r in rows):
    servers = list(dict.fromkeys(r["server"] for r in rows if r["storage"] == storage))
    print(f"\n### {storage}: medians\n")
    print("| workload | server | MB/s | IOPS | p99 µs | CPU s/GiB | flush s | spread % |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for workload in workloads:
        for server in servers:
            key = (storage, server, workload)
            if key not in cells:
                continue
            print(f"| {workload} | {server} | {fmt(median(key, 'mb_s'))} | {fmt(median(key, 'iops'))} | "
                  f"{fmt(median(key, 'p99_us'))} | {fmt(cpu_per_gib(key), 3)} | {fmt(median(key, 'flush_s'), 2)} | "
                  f"{fmt(spread(key))} |")

    print(f"\n### {storage}: ratios (nbdcrypt / peer, medians of MB/s)\n")
    print("| workload | none: vs qemu raw | none: vs qemu LUKS | writeback: vs best peer (which) | CPU s/GiB minus qemu raw (none) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for workload in workloads:
        ours_none = median((storage, "nbdcrypt-none", workload), "mb_s")
        ours_wb = median((storage, "nbdcrypt-writeback", workload), "mb_s")
        raw = median((storage, "qemu-raw-none", workload), "mb_s")
        luks = median((storage, "qemu-luks-none", workload), "mb_s")
        best = max(((median((storage, p, workload), "mb_s") or 0, p) for p in peers["writeback"]), default=(0, "-"))
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
        cpu_ours = cpu_per_gib((storage, "nbdcrypt-none", workload))
        cpu_raw = cpu_per_gib((storage, "qemu-raw-none", workload))
        cpu_delta = f"{cpu_ours - cpu_raw:+.3f}" if cpu_ours is not None and cpu_raw is not None else "-"
        print(f"| {workload} | {ratio(ours_none, raw)} | {ratio(ours_none, luks)} | "
              f"{ratio(ours_wb, best[0])} ({best[1]}) | {cpu_delta} |")

    print(f"\n### {storage}: peak RSS (KiB, max over sessions)\n")
    print("| server | peak RSS |")
    print("| --- | ---: |")
    for server in servers:
        values = [int(s["peak_rss_kib"]) for s in sessions if s["storage"] == storage and s["server"] == server and s["peak_rss_kib"]]
        print(f"| {server} | {max(values) if values else '-'} |")
PY
}

WORK=$(mktemp -d /dev/shm/nbdcrypt-bench-work.XXXXXX)
mkdir -p /dev/shm/nbdcrypt-bench
SOURCE=/dev/shm/nbdcrypt-bench/source.img
log "writing $SIZE of pseudo-random source data"
# AES-CTR keystream: incompressible like real data, and much faster than /dev/urandom here.
# openssl ends with SIGPIPE when head has enough, which is success here.
(openssl enc -aes-128-ctr -nosalt -pass pass:nbdcrypt-bench -pbkdf2 </dev/zero 2>/dev/null || true) |
  head -c "$SIZE_BYTES" >"$SOURCE"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "kernel: $(uname -r)"
  echo "nbdcrypt: $("$BIN" --version) ($(git rev-parse --short HEAD))"
  echo "qemu-nbd: $(qemu-nbd --version | head -1)"
  echo "nbdkit: $(nbdkit --version)"
  echo "nbd-server: $(nbd-server -V 2>&1 | head -1)"
  echo "fio: $(fio --version), nbdcopy: $(nbdcopy --version | head -1)"
  echo "size: $SIZE, fio runtime: ${RUNTIME}s, repetitions: shm $REPS, disk $DISK_REPS"
} >"$OUT/machine.txt"

for storage in $STORAGES; do
  reps=$REPS
  servers=$SERVERS
  if [[ $storage == disk ]]; then
    reps=$DISK_REPS
    servers=$DISK_SERVERS
  fi
  log "$storage: preparing volumes"
  prepare_storage "$storage"
  for rep in $(seq "$reps"); do
    for server in $servers; do
      mode=$(mode_of "$server")
      log "$storage rep $rep: $server"
      start_server "$server"
      for workload in $WORKLOADS; do
        run_workload "$storage" "$server" "$mode" "$workload" "$rep"
      done
      printf '%s\t%s\t%s\t%s\n' "$storage" "$server" "$rep" "$(peak_rss_kib "$SERVER_PID")" >>"$SESSIONS"
      stop_server
    done
  done
  release_storage
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"

report "$OUT" | tee "$OUT/results.md"
