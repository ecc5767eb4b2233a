#!/usr/bin/env bash
# scripts/bench.d/rebuild.sh — run as `scripts/bench rebuild`: the issue's
# target "rebuild of a 4 GiB partition under a QD8 foreground load: report
# MB/s and the foreground slowdown".
#
# One run:
#
#  1. starts a 3-node `stord run` cluster (scripts/cluster-up 3, on
#     CLUSTER_IP_PREFIX.11-13), sets the lease to 1500ms and the suspect
#     timeout to 750ms, creates volume "rb" (REBUILD_SIZE, one partition,
#     --replicas 2, 4096-byte blocks) and waits for a primary and 2 in-sync
#     replicas. The node holding no replica of the partition is "the third
#     node";
#  2. fills the volume: fio sequential write, 1M blocks, QD8, the whole
#     volume, through the primary's NBD, then a flush;
#  3. baseline: the foreground job for REBUILD_FG_SECONDS through the third
#     node's NBD (so every I/O takes one node hop, as it will during the
#     rebuild):
#
#       fio --ioengine=nbd --rw=randrw --rwmixread=70 --bs=4k --iodepth=8
#           --size=REBUILD_SIZE --time_based --randrepeat=0 --norandommap
#
#     (REBUILD_FG_RW=randwrite drops the reads); IOPS are reads + writes;
#  4. rebuild: the same job again, time-based up to REBUILD_TIMEOUT, with an
#     IOPS log (--write_iops_log, --log_avg_msec=500, --log_unix_epoch=1).
#     3 s after fio starts it SIGKILLs the stord of the partition's
#     secondary (`storctl -o json volume show rb`: partitions[0].
#     secondaries[0]). The control plane declares it dead after the lease
#     and places a replacement on the third node, the only one left; the
#     primary provisions it. Every 0.5 s it reads `storctl -o json volume
#     show rb` (the placement, and the "rebuild" rows that `volume
#     rebuild-status` prints: one call gives both): "placed" is the first
#     answer listing the replacement among the secondaries, "in sync" the
#     first listing it in in_sync; then fio is stopped (SIGTERM);
#  5. reports rebuild time = in sync - placed (each known to the poll
#     interval plus one storctl call), rebuild MB/s = REBUILD_SIZE / that
#     time (the partition holds REBUILD_SIZE of data; what crossed the wire
#     may differ: the foreground rewrote some of it, and a log replay sends
#     ops, not blocks), the foreground IOPS inside [placed, in sync] (from
#     the IOPS log: the 500 ms samples whose midpoint lies in the window,
#     their I/Os over the window's length; an interval with no I/O has no
#     sample and counts as zero), the slowdown during/baseline, and how the
#     replacement was provisioned: "snapshot" if the primary's log has
#     "snapshot sent" (with its bytes and time, the transfer's own rate),
#     else "log replay". Below the table: when the replacement was placed,
#     first showed progress (a rebuild row with done > 0: the time before
#     it is waiting, not copying) and was in sync, relative to the kill;
#     the foreground's IOPS before the kill and between kill and placement,
#     and its longest I/O; how many polls failed (the control plane
#     unreachable or without a leader).
#
# Notes on what it measures: the third node both serves fio's NBD and
# receives the rebuild, by design (3 nodes, 2
# replicas: the replacement can go nowhere else); all three nodes and fio
# share this machine's CPUs and disk. During the rebuild the primary has
# no in-sync peer, so its writes commit on it alone (a solo blessing, see
# replica/head) while the baseline's committed on both replicas: the
# slowdown is the rebuild's cost net of that.
#
# Environment:
#   REBUILD_SIZE        volume = partition = data size (default 4G)
#   REBUILD_FG_SECONDS  baseline length in seconds (default 20)
#   REBUILD_FG_RW       randrw (default; 70% reads) or randwrite
#   REBUILD_TIMEOUT     seconds the rebuild may take from the kill until in
#                       sync (default 600); bounds the second fio run too
#   BENCH_DIR           parent of the run's temp dir (default /tmp)
#   BENCH_KEEP=1        keep the nodes' data dirs
#   CLUSTER_IP_PREFIX   the cluster's first three octets (default 127.0.79:
#                       nodes on 127.0.79.11-13, cluster-up's fixed ports)
#   STORD, STORCTL      prebuilt binaries (default: go build from this checkout)
#
# Results (fio JSON and IOPS logs, the poll record poll.jsonl, node logs,
# table.md) stay in the run's temp dir. Every process this script starts is
# stopped on exit (the cluster with scripts/cluster-down, the killed node
# included: it is not restarted); every wait, poll and fio run is bounded.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
scripts=$(cd "$here/.." && pwd)
repo=$(cd "$scripts/.." && pwd)

# The exact command, with the settings that shaped it.
cmdline=""
for v in BENCH_DIR BENCH_KEEP REBUILD_SIZE REBUILD_FG_SECONDS REBUILD_FG_RW REBUILD_TIMEOUT CLUSTER_IP_PREFIX STORD STORCTL; do
	if [[ -n ${!v:-} ]]; then cmdline+="$v=$(printf %q "${!v}") "; fi
done
cmdline+="scripts/bench rebuild"

die() {
	echo "bench rebuild: $*" >&2
	exit 1
}
say() { echo "bench rebuild: $*" >&2; }

size=${REBUILD_SIZE:-4G}
fg_secs=${REBUILD_FG_SECONDS:-20}
fg_rw=${REBUILD_FG_RW:-randrw}
bound=${REBUILD_TIMEOUT:-600}
pfx=${CLUSTER_IP_PREFIX:-127.0.79}
kill_after=3 # seconds of the second fio run before the kill

[[ $fg_secs =~ ^[0-9]+$ && $fg_secs -ge 1 && $fg_secs -le 600 ]] || die "REBUILD_FG_SECONDS must be 1..600"
[[ $bound =~ ^[0-9]+$ && $bound -ge 10 && $bound -le 3600 ]] || die "REBUILD_TIMEOUT must be 10..3600 seconds"
case $fg_rw in
randrw) fg_args=(--rw=randrw --rwmixread=70) ;;
randwrite) fg_args=(--rw=randwrite) ;;
*) die "REBUILD_FG_RW must be randrw or randwrite" ;;
esac
[[ $pfx =~ ^127\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "CLUSTER_IP_PREFIX must be 127.X.Y (loopback only)"
for tool in fio python3 nbdinfo timeout numfmt; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install fio libnbd-bin)"
done
size_bytes=$(numfmt --from=iec "${size%B}" 2>/dev/null) || die "REBUILD_SIZE '$size' is not a size (e.g. 1G, 4G)"
((size_bytes >= 64 << 20 && size_bytes % (1 << 20) == 0)) || die "REBUILD_SIZE must be at least 64M and a multiple of 1M"

parent=${BENCH_DIR:-/tmp}
mkdir -p "$parent"
work=$(mktemp -d "$parent/stor-bench-rebuild.XXXXXX")
res=$work/results
cdir=$work/cluster
mkdir -p "$res" "$cdir"

child_pid="" fio_pid="" poll_pid="" cluster_started=0 built=""

# stop PID NAME [SECS]: SIGTERM, wait up to SECS (default 10) s, then
# SIGKILL. Only pids we started; each is a `timeout` (which passes SIGTERM
# on and leads the process group of what it runs), so the SIGKILL goes to
# its group, the command under it included.
stop() {
	local pid=$1 name=$2 secs=${3:-10} i
	[[ -n $pid ]] || return 0
	kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < secs * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	say "$name ($pid) ignored SIGTERM for $secs s; killing its process group"
	kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
	local rc=$?
	# Ignore further INT/TERM until done: a second signal (timeout(1) sends
	# one to its child and one to the group) must not cut the cleanup short.
	trap - EXIT
	trap '' INT TERM
	stop "$poll_pid" poller
	stop "$fio_pid" fio
	stop "$child_pid" fio
	if ((cluster_started)); then
		"$scripts/cluster-down" "$cdir" >>"$res/cluster.log" 2>&1 || say "cluster-down failed; see $res/cluster.log"
	fi
	wait 2>/dev/null || true
	cp "$cdir"/n*.log "$res/" 2>/dev/null || true
	if [[ ${BENCH_KEEP:-0} != 1 ]]; then
		rm -rf "$work/bin" "$cdir"
	fi
	say "results in $res"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# bounded SECS LOG CMD...: CMD under timeout, output appended to LOG,
# waited for in the background so a signal to this script is handled at once.
bounded() {
	local secs=$1 log=$2
	shift 2
	timeout -k 10 "$secs" "$@" >>"$log" 2>&1 &
	child_pid=$!
	local rc=0
	wait "$child_pid" || rc=$?
	child_pid=""
	return "$rc"
}

# wait_nbd URI NAME: until nbdinfo can open URI, at most 30 s.
wait_nbd() {
	local uri=$1 name=$2 i
	for ((i = 0; i < 150; i++)); do
		if timeout 5 nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
		sleep 0.2
	done
	die "$name did not serve $uri within 30 s; see $cdir/n*.log"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
now_ms() { date +%s%3N; }

ctl() { timeout 40 "$storctl" --api "$api" --timeout 30s "$@"; }

# placement NAME: "PRIMARY EPOCH IN_SYNC_COUNT PARTITIONS SECONDARIES" of
# volume NAME's first partition (SECONDARIES comma-separated, or -).
placement() {
	ctl -o json volume show "$1" 2>>"$res/cluster.log" | python3 -c '
import json, sys
v = json.load(sys.stdin)
p = v["partitions"][0]
print(p.get("primary") or "-", p.get("epoch", 0), len(p.get("in_sync") or []), len(v["partitions"]),
      ",".join(p.get("secondaries") or []) or "-")' 2>>"$res/cluster.log"
}

# wait_ready NAME REPLICAS: until the partition has a primary and REPLICAS
# in-sync replicas, at most 60 s.
wait_ready() {
	local i prim epoch ins parts secs
	for ((i = 0; i < 300; i++)); do
		if read -r prim epoch ins parts secs < <(placement "$1") && [[ $prim != - && $ins == "$2" ]]; then
			[[ $parts == 1 ]] || die "volume $1 has $parts partitions, want 1"
			return 0
		fi
		sleep 0.2
	done
	die "volume $1 not ready (primary and $2 in sync) within 60 s; last: ${prim:-?} epoch ${epoch:-?} in_sync ${ins:-?}"
}

# nbd_addr NODE: NODE's NBD address from the node list.
nbd_addr() {
	ctl -o json node list | python3 -c '
import json, sys
for n in json.load(sys.stdin):
    if n["id"] == sys.argv[1]:
        print(n["addresses"]["nbd"])' "$1"
}

# node_pid NODE: the pid of NODE's stord, checked by its command line as
# scripts/cluster-down checks it.
node_pid() {
	local pid
	pid=$(cat "$cdir/$1.pid" 2>/dev/null) || return 1
	[[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--node-id $1 --data $cdir/$1 " || return 1
	echo "$pid"
}

start_cluster() {
	local bin=$work/bin
	if [[ -n ${STORD:-} && -n ${STORCTL:-} ]]; then
		stord=$STORD storctl=$STORCTL
		built="prebuilt $STORD"
	else
		command -v go >/dev/null || die "go not found (or set STORD and STORCTL)"
		say "building stord and storctl"
		mkdir -p "$bin"
		(cd "$repo" && go build -o "$bin/stord" ./cmd/stord && go build -o "$bin/storctl" ./cmd/storctl) ||
			die "build failed"
		stord=$bin/stord storctl=$bin/storctl
		built="built from checkout $(git -C "$repo" describe --always --dirty 2>/dev/null || echo '?')"
	fi
	# cluster-up binds fixed ports on $pfx.11-13: refuse to start beside a
	# cluster that already uses them.
	python3 - "$pfx" 2>/dev/null <<-'EOF' || die "ports 7480-7482/10809/3260 on $pfx.11-13 are in use; set CLUSTER_IP_PREFIX"
		import socket, sys
		for host in (sys.argv[1] + ".11", sys.argv[1] + ".12", sys.argv[1] + ".13"):
		    for port in (7480, 7481, 7482, 10809, 3260):
		        s = socket.socket()
		        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
		        s.bind((host, port))
		        s.close()
	EOF
	cluster_started=1
	CLUSTER_IP_PREFIX=$pfx STORD=$stord STORCTL=$storctl CLUSTER_UP_TIMEOUT=60 \
		timeout -k 10 90 "$scripts/cluster-up" 3 "$cdir" >>"$res/cluster.log" 2>&1 ||
		die "cluster-up failed; see $res/cluster.log and $cdir/n*.log"
	api=http://$pfx.11:7480
	ctl cluster configure --lease-timeout 1500ms --suspect-timeout 750ms >>"$res/cluster.log" 2>&1 ||
		die "cluster configure failed; see $res/cluster.log"
	ctl volume create rb --size "$size_bytes" --partition-size "$size_bytes" --replicas 2 \
		--block-size 4096 >>"$res/cluster.log" 2>&1 || die "volume create rb failed; see $res/cluster.log"
	wait_ready rb 2
}

# The poller: every 0.5 s (bounded by a deadline and a count) one `storctl
# -o json volume show`, each answer a line of poll.jsonl with its time;
# "placed" is the first answer with a secondary other than the primary and
# the killed node, "in sync" the first with that node in in_sync,
# "progress" the first whose rebuild row for it has done > 0. It notes
# progress on stderr every 5 s; its stdout is one JSON summary.
cat >"$work/poll.py" <<'EOF'
import json, subprocess, sys, time

storctl, api, volume, primary, killed, bound, out = sys.argv[1:8]
deadline = time.time() + float(bound)
interval = 0.5
placed = insync = progress = None  # (answer time, call start)
repl = None
last_note = 0.0
polls = errors = 0
last = {}
with open(out, "a") as rec:
    for _ in range(int(float(bound) / interval) + 1):
        start = time.time()
        if start > deadline:
            break
        polls += 1
        v, err = None, ""
        try:
            p = subprocess.run([storctl, "--api", api, "--timeout", "5s", "-o", "json", "volume", "show", volume],
                               capture_output=True, text=True, timeout=10)
            if p.returncode != 0:
                err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            else:
                v = json.loads(p.stdout)
                if not v.get("partitions"):
                    # storctl prints the bare volume when the cluster
                    # API answered with an error.
                    v, err = None, "no placement in the answer"
        except subprocess.TimeoutExpired:
            err = "storctl timed out"
        except ValueError as e:
            err = f"bad JSON: {e}"
        t = time.time()
        if v is None:
            errors += 1
            rec.write(json.dumps({"t0_ms": int(start * 1000), "t_ms": int(t * 1000), "error": err}) + "\n")
            rec.flush()
        else:
            part = v["partitions"][0]
            secs = part.get("secondaries") or []
            ins = part.get("in_sync") or []
            rows = v.get("rebuild") or []
            last = {"primary": part.get("primary", ""), "epoch": part.get("epoch", 0), "secondaries": secs,
                    "in_sync": ins, "rebuild": rows}
            rec.write(json.dumps({"t0_ms": int(start * 1000), "t_ms": int(t * 1000), **last}) + "\n")
            rec.flush()
            new = [s for s in secs if s not in (primary, killed)]
            if new and placed is None:
                placed, repl = (t, start), new[0]
                print(f"bench rebuild: replacement {repl} placed", file=sys.stderr, flush=True)
            row = next((r for r in rows if r.get("replica") == repl), None) if repl else None
            if progress is None and (row and row.get("done", 0) > 0 or placed is not None and repl in ins):
                progress = (t, start)
            if placed is not None and repl in ins:
                insync = (t, start)
                break
            if t - last_note >= 5:
                last_note = t
                if row:
                    print(f"bench rebuild: {repl} {row['state']} {row['percent']:.0f}% "
                          f"({row['done']}/{row['total']} ops) {row.get('note', '')}", file=sys.stderr, flush=True)
        time.sleep(max(0.0, start + interval - time.time()))
ms = lambda x: int(x * 1000)
print(json.dumps({"placed_ms": ms(placed[0]) if placed else None,
                  "placed_call_ms": ms(placed[0] - placed[1]) if placed else None,
                  "insync_ms": ms(insync[0]) if insync else None,
                  "insync_call_ms": ms(insync[0] - insync[1]) if insync else None,
                  "progress_ms": ms(progress[0]) if progress else None,
                  "replacement": repl, "polls": polls, "errors": errors, "last": last}))
EOF

say "in $work: volume rb $size (one partition, 2 replicas), foreground 4k $fg_rw QD8 ${fg_secs} s, cluster on $pfx.11-13"
load_start=$(loadavg)
avail=$(df -Pk "$work" | awk 'NR==2 {print $4}')
((avail * 1024 > 3 * size_bytes + (4 << 30))) || die "less than 3 x REBUILD_SIZE + 4 GiB free under $work"
start_cluster

read -r prim epoch ins parts secs < <(placement rb) || die "volume show rb failed"
sec=${secs%%,*}
[[ $prim != - && $sec != - ]] || die "volume rb has no primary or secondary: $prim / $secs"
third=$(ctl -o json node list | python3 -c '
import json, sys
held = {sys.argv[1], *sys.argv[2].split(",")}
print(" ".join(n["id"] for n in json.load(sys.stdin) if n["id"] not in held))' "$prim" "$secs")
[[ $third =~ ^n[0-9]+$ ]] || die "want exactly one node holding no replica of rb, got '$third'"
uri_p=nbd://$(nbd_addr "$prim")/rb
uri_t=nbd://$(nbd_addr "$third")/rb
say "primary $prim (epoch $epoch), secondary $sec, third node $third; fill through $uri_p, foreground through $uri_t"
wait_nbd "$uri_p" "$prim"
wait_nbd "$uri_t" "$third"

say "filling rb ($size, 1M sequential writes, QD8)"
t=$SECONDS
bounded 1800 "$res/fio.log" fio --name=fill --ioengine=nbd --uri="$uri_p" --rw=write --bs=1m --iodepth=8 \
	--size="$size_bytes" --end_fsync=1 --output-format=json --output="$res/fill.json" ||
	die "fill failed; see $res/fio.log"
fill_secs=$((SECONDS - t))
wait_ready rb 2

fio_fg=(fio --ioengine=nbd --uri="$uri_t" "${fg_args[@]}" --bs=4k --iodepth=8 --size="$size_bytes"
	--time_based --randrepeat=0 --norandommap --group_reporting --output-format=json)

say "baseline: 4k $fg_rw QD8 for ${fg_secs} s through $third"
bounded $((fg_secs + 120)) "$res/fio.log" "${fio_fg[@]}" --name=baseline --runtime="$fg_secs" \
	--write_iops_log="$res/baseline" --log_avg_msec=500 --log_unix_epoch=1 --output="$res/baseline.json" ||
	die "baseline fio failed; see $res/fio.log"
read -r prim2 epoch2 ins2 parts2 secs2 < <(placement rb) || die "volume show rb failed"
[[ $prim2 == "$prim" && $ins2 == 2 ]] || die "placement moved during the baseline: $prim2 epoch $epoch2, $ins2 in sync"
leader=$(ctl -o json cluster status | python3 -c 'import json, sys; print(json.load(sys.stdin).get("leader", "?"))') || leader="?"

say "rebuild run: 4k $fg_rw QD8 through $third; SIGKILL $sec after ${kill_after} s"
t_fio=$(now_ms)
timeout -k 10 $((bound + 60)) "${fio_fg[@]}" --name=rebuild --runtime=$((bound + kill_after)) \
	--write_iops_log="$res/rebuild" --log_avg_msec=500 --log_unix_epoch=1 \
	--output="$res/rebuild.json" >>"$res/fio.log" 2>&1 &
fio_pid=$!
sleep "$kill_after"
kill -0 "$fio_pid" 2>/dev/null || die "the rebuild run's fio exited early; see $res/fio.log"
victim=$(node_pid "$sec") || die "no running stord for $sec"
t_kill=$(now_ms)
kill -KILL "$victim"
say "killed $sec (pid $victim; raft leader: $leader)"

timeout -k 10 $((bound + 30)) python3 "$work/poll.py" "$storctl" "$api" rb "$prim" "$sec" "$bound" \
	"$res/poll.jsonl" >"$res/poll.out" &
poll_pid=$!
rc=0
wait "$poll_pid" || rc=$?
poll_pid=""
((rc == 0)) || die "poller failed (exit $rc); see above and $res/poll.jsonl"
summary=$(tail -n 1 "$res/poll.out")
t_stop=$(now_ms)
stop "$fio_pid" fio 60 # fio finishes its I/Os in flight and writes its JSON
wait "$fio_pid" || true
fio_pid=""
load_end=$(loadavg)

snap=$(grep -h 'msg="snapshot sent"' "$cdir/$prim.log" 2>/dev/null | tail -n 1 || true)
abandoned=$(grep -c 'msg="snapshot transfer abandoned"' "$cdir/$prim.log" 2>/dev/null || true)

{
	echo "## scripts/bench rebuild — $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo
	echo "command: $cmdline"
	echo "machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r)"
	echo "filesystem: $(df -PT "$work" | awk 'NR==2 {print $2 " on " $1}') ($work)"
	echo "tools: $(fio --version), stord $built"
	echo
	python3 - "$res" "$size_bytes" "$summary" "$t_fio" "$t_kill" "$t_stop" "$snap" "${abandoned:-0}" <<'EOF'
import json, re, sys

res, size, summary = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
t_fio, t_kill, t_stop = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
snap, abandoned = sys.argv[7], int(sys.argv[8])

def load(path):
    with open(path) as f:
        text = f.read()
    start = text.find("{")  # fio may print a line before the JSON
    if start < 0:
        raise ValueError(f"{path}: no JSON in fio output")
    return json.loads(text[start:])

def iops(job):
    return job["read"]["iops"] + job["write"]["iops"]

def samples(prefix):
    # (time ms, IOPS) per 500 ms interval, reads and writes summed.
    per = {}
    with open(f"{res}/{prefix}_iops.1.log") as f:
        for line in f:
            cols = [c.strip() for c in line.split(",")]
            if len(cols) >= 3 and cols[2] in ("0", "1"):
                per[int(cols[0])] = per.get(int(cols[0]), 0) + int(cols[1])
    return sorted(per.items())

def window(ss, a, b):
    # I/Os of the samples whose 500 ms interval has its midpoint in [a, b],
    # over the window's length; intervals without a sample had no I/O.
    if b - a <= 0:
        return None
    ios = sum(v * 0.5 for t, v in ss if a <= t - 250 <= b)
    return ios / ((b - a) / 1000)

base_job = load(f"{res}/baseline.json")["jobs"][0]
reb_job = load(f"{res}/rebuild.json")["jobs"][0]
for name, job in (("baseline", base_job), ("rebuild", reb_job)):
    if job.get("error"):
        sys.exit(f"{name}: fio job error {job['error']}")
base = iops(base_job)
ss = samples("rebuild")
placed, insync = summary["placed_ms"], summary["insync_ms"]
repl = summary["replacement"]
done = placed is not None and insync is not None

def fmt(v):
    return "-" if v is None else (f"{v / 1000:.1f}k" if v >= 10_000 else f"{v:.0f}")

during = window(ss, placed, insync) if done else None
secs = (insync - placed) / 1000 if done else None
mbs = size / 1e6 / secs if secs else None
if snap:
    m = {k: v for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', snap)}
    prov = f"snapshot ({int(m.get('bytes', '0')) / 1e6:.0f} MB in {m.get('took', '?')}"
    try:
        took = m.get("took", "")
        sec = float(took[:-2]) / 1000 if took.endswith("ms") else float(took[:-1]) if took.endswith("s") else None
        if sec:
            prov += f", {int(m['bytes']) / 1e6 / sec:.0f} MB/s on the wire"
    except (ValueError, KeyError):
        pass
    prov += ")"
else:
    prov = "log replay (no \"snapshot sent\" in the primary's log)"
if abandoned:
    prov += f"; {abandoned} snapshot transfer(s) abandoned first"

rows = [
    ("foreground IOPS, baseline (2 replicas in sync)", fmt(base)),
    ("foreground IOPS during the rebuild", fmt(during)),
    ("during / baseline", f"{during / base:.2f}" if during is not None and base else "-"),
    ("rebuild time, placed -> in sync", f"{secs:.1f} s" if secs else "not in sync within the bound"),
    ("rebuild rate, REBUILD_SIZE / time", f"{mbs:.0f} MB/s" if mbs else "-"),
    ("provisioned by", prov),
]
w = max(len(r[0]) for r in rows)
v = max(len(r[1]) for r in rows)
print(f"| {'figure'.ljust(w)} | {'value'.ljust(v)} |")
print(f"|{'-' * (w + 2)}|{'-' * (v + 2)}|")
for a, b in rows:
    print(f"| {a.ljust(w)} | {b.ljust(v)} |")
print()
rel = lambda t: "-" if t is None else f"{(t - t_kill) / 1000:+.1f} s"
before = window(ss, t_fio + 500, t_kill)
gap = window(ss, t_kill, placed) if placed else None
print(f"timeline from the kill: replacement {repl or '-'} placed {rel(placed)}, first progress seen "
      f"{rel(summary['progress_ms'])}, in sync {rel(insync)}, "
      f"fio stopped {rel(t_stop)}; polls every 0.5 s: {summary['polls']}, {summary['errors']} failed; "
      f"the storctl calls that saw placed / in sync took {summary['placed_call_ms']} / {summary['insync_call_ms']} ms")
print(f"foreground IOPS before the kill {fmt(before)}, kill -> placed {fmt(gap)}; "
      f"rebuild run total {reb_job['read']['total_ios'] + reb_job['write']['total_ios']} I/Os, "
      f"longest I/O {max(reb_job[d]['lat_ns']['max'] for d in ('read', 'write')) / 1e6:.0f} ms, "
      f"500 ms intervals with I/O in the window {sum(1 for t, _ in ss if done and placed <= t - 250 <= insync)}"
      f" of {int((insync - placed) / 500) if done else 0}")
last = summary.get("last") or {}
print(f"at the end: primary {last.get('primary', '?')} epoch {last.get('epoch', '?')}, "
      f"secondaries {','.join(last.get('secondaries') or []) or '-'}, in sync {','.join(last.get('in_sync') or []) or '-'}")
EOF
	echo "volume rb: $size, one partition, 2 replicas; primary $prim, killed secondary $sec (SIGKILL ${kill_after} s into the run; raft leader then: $leader), replacement on $third"
	echo "fill: $size in ${fill_secs} s through $prim; foreground: fio nbd 4k $fg_rw$([[ $fg_rw == randrw ]] && echo ' (70% reads)') QD8, one job, through $third; IOPS are reads + writes"
	printf 'load average (1/5/15 min): start %s; end %s\n' "$load_start" "$load_end"
	if awk -v n="$(nproc)" '{exit !($1 > n || $4 > n)}' <<<"$load_start $load_end"; then
		echo "warning: load average above the CPU count during the run; other work shared the machine, so treat figures as rough"
	fi
	echo "lease 1500ms, suspect 750ms; rebuild times are to the 0.5 s poll plus one storctl call"
} | tee "$res/table.md"
python3 -c 'import json, sys; sys.exit(json.loads(sys.argv[1])["insync_ms"] is None)' "$summary" ||
	die "the replacement was not in sync within REBUILD_TIMEOUT ($bound s) of the kill; see $res/poll.jsonl and the node logs"
