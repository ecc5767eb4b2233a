#!/usr/bin/env bash
# scripts/bench.d/replicated.sh — run as `scripts/bench replicated`: what
# replication costs. One run starts a 2-node `stord run` cluster
# (scripts/cluster-up) and Debian's nbd-server on a file, all on one
# filesystem, and drives five targets with fio's nbd engine:
#
#   target      what                                                      fio connects to
#   r2          stor volume, --replicas 2, one partition (partition = size) the partition's primary
#   r1          stor volume, --replicas 1, one partition                   the partition's primary
#   nbd-server  Debian's nbd-server on a sparse file (flush, fua on)       127.0.0.1
#   floor-r2    bench.d/floor.c: a bare C NBD server that pwrites each     127.0.0.1
#               write, forwards it to a second bare process that pwrites
#               it too, and replies when that answers
#   floor-r1    the same bare server without the second process            127.0.0.1
#
# The floor targets are not designs (no checksums, journal records, opnums
# or epochs; blocking sockets, one request at a time): at queue depth 1
# their r2/r1 is what the extra process hop alone costs on this machine —
# wake-ups, system calls, loopback TCP — so the table can say how far
# stor's r2/r1 is from the least any primary -> secondary ->
# acknowledgement design could reach here. They do not pipeline, so their
# QD32 figures say nothing; the floor's ratio is shown for the QD1 rows
# only. They need a C compiler (cc).
#
# The primary is read from `storctl -o json volume show` and its NBD
# address from `storctl -o json node list`, so no cell crosses a node hop
# on the way in; r2's writes do cross one, to the secondary, and commit on
# both before they are acknowledged. Both nodes share this machine's CPUs.
#
# Rows (one fio job, one connection per cell):
#
#   row                 rw         bs  iodepth  extra
#   4k-randwrite-qd1    randwrite  4k  1
#   4k-randwrite-qd32   randwrite  4k  32
#   4k-randwrite-fsync  randwrite  4k  1        --fsync=1 (NBD FLUSH after each write)
#
# Every target first gets its region (BENCH_SIZE) written sequentially and
# flushed. Rounds rotate the order of the targets. Before every cell the
# script waits until both nodes are back to their idle CPU use (what they
# used in 3 s before the first write, plus 4 % of a CPU) for 4 s in a row,
# at most BENCH_SETTLE seconds: a volume's background work after a cell
# (moving what the cell wrote into shards, defragmenting it once idle) then
# runs inside the next target's cell, on either node, only where it takes
# longer than that (the idle defrag of 6 s of 4k random writes over 1 GiB
# can take over 90 s on a 2-vCPU VM; the table says how long each wait
# was). The table gives, per row and target, the median over rounds of IOPS
# and of the p50/p99 completion latency (the fsync row: the flush's
# latency, as scripts/bench), then the
# ratios r2/r1 IOPS, r2/r1 p50, r2/nbd-server IOPS and the floor's r2/r1
# p50, then the targets (the QD1 one with the floor's ratio beside it):
#
#   2-replica 4k randwrite QD32 IOPS >= 0.6x unreplicated   (r2/r1, row 4k-randwrite-qd32)
#   QD1 p50 latency <= 2x unreplicated                      (r2/r1, row 4k-randwrite-qd1)
#
# Environment:
#   BENCH_DIR          parent of the run's temp dir (default /tmp)
#   BENCH_SIZE         size of each volume and of the test region (default 1G)
#   BENCH_RUNTIME      seconds per cell (default 10; 3 with BENCH_QUICK=1)
#   ROUNDS             rounds (default 3; 1 with BENCH_QUICK=1)
#   BENCH_QUICK=1      3 s cells, 1 round
#   BENCH_KEEP=1       keep the backing file and the nodes' data dirs
#   BENCH_SETTLE       longest wait for the nodes to go idle before a cell,
#                      seconds (default 30; 0: no wait)
#   CLUSTER_IP_PREFIX  the cluster's first three octets (default 127.0.77:
#                      nodes on 127.0.77.11 and .12, cluster-up's fixed ports)
#   STORD, STORCTL     prebuilt binaries (default: go build from this checkout)
#
# Results (fio JSON per cell as ROW.TARGET.roundN.json, node and server
# logs, table.md) stay in the run's temp dir. Every process this script
# starts is stopped on exit (the cluster with scripts/cluster-down); every
# wait and every cell is bounded.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
scripts=$(cd "$here/.." && pwd)
repo=$(cd "$scripts/.." && pwd)

# The exact command, with the settings that shaped it.
cmdline=""
for v in BENCH_DIR BENCH_SIZE BENCH_RUNTIME ROUNDS BENCH_QUICK BENCH_KEEP BENCH_SETTLE CLUSTER_IP_PREFIX STORD STORCTL; do
	if [[ -n ${!v:-} ]]; then cmdline+="$v=$(printf %q "${!v}") "; fi
done
cmdline+="scripts/bench replicated"

die() {
	echo "bench replicated: $*" >&2
	exit 1
}

quick=${BENCH_QUICK:-0}
size=${BENCH_SIZE:-1G}
if [[ $quick == 1 ]]; then
	runtime=${BENCH_RUNTIME:-3}
	rounds=${ROUNDS:-1}
else
	runtime=${BENCH_RUNTIME:-10}
	rounds=${ROUNDS:-3}
fi
pfx=${CLUSTER_IP_PREFIX:-127.0.77}
settle_max=${BENCH_SETTLE:-30}
rows=(4k-randwrite-qd1 4k-randwrite-qd32 4k-randwrite-fsync)
peers=(r2 r1 nbd-server floor-r2 floor-r1)

[[ $runtime =~ ^[0-9]+$ && $runtime -ge 1 && $runtime -le 600 ]] || die "BENCH_RUNTIME must be 1..600 seconds"
[[ $rounds =~ ^[0-9]+$ && $rounds -ge 1 && $rounds -le 20 ]] || die "ROUNDS must be 1..20"
[[ $settle_max =~ ^[0-9]+$ && $settle_max -le 600 ]] || die "BENCH_SETTLE must be 0..600 seconds"
[[ $pfx =~ ^127\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "CLUSTER_IP_PREFIX must be 127.X.Y (loopback only)"
for tool in fio python3 nbdinfo nbd-server truncate timeout numfmt cc; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install fio libnbd-bin nbd-server gcc)"
done
size_bytes=$(numfmt --from=iec "${size%B}" 2>/dev/null) || die "BENCH_SIZE '$size' is not a size (e.g. 256M, 1G)"
((size_bytes >= 4 << 20 && size_bytes % 4096 == 0)) || die "BENCH_SIZE must be at least 4M and a multiple of 4k"

parent=${BENCH_DIR:-/tmp}
mkdir -p "$parent"
work=$(mktemp -d "$parent/stor-bench-replicated.XXXXXX")
res=$work/results
cdir=$work/cluster
mkdir -p "$res" "$work/data" "$cdir"

nbdsrv_pid="" child_pid="" cluster_started=0 built="" floor_pids=()

# stop PID NAME: SIGTERM, wait up to 10 s, then SIGKILL. Only pids we started.
stop() {
	local pid=$1 name=$2 i
	[[ -n $pid ]] || return 0
	kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	echo "bench replicated: $name ($pid) ignored SIGTERM for 10 s; killing" >&2
	kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	stop "$child_pid" fio
	if ((cluster_started)); then
		"$scripts/cluster-down" "$cdir" >>"$res/cluster.log" 2>&1 || echo "bench replicated: cluster-down failed; see $res/cluster.log" >&2
	fi
	stop "$nbdsrv_pid" nbd-server
	for pid in "${floor_pids[@]}"; do
		stop "$pid" floor
	done
	wait 2>/dev/null || true
	cp "$cdir"/n*.log "$res/" 2>/dev/null || true
	if [[ ${BENCH_KEEP:-0} != 1 ]]; then
		rm -rf "$work/data" "$work/bin" "$cdir"
	fi
	echo "bench replicated: results in $res" >&2
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
	die "$name did not serve $uri within 30 s; see $res/"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# Guard the disk: the cells write tens of GB; stop before filling it.
check_space() {
	local avail
	avail=$(df -Pk "$work" | awk 'NR==2 {print $4}')
	((avail > 4 * 1024 * 1024)) || die "less than 4 GiB free under $work; stopping"
}

declare -A uri

# free_port: a TCP port on 127.0.0.1 free now.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_nbdsrv() {
	local port i
	port=$(free_port)
	truncate -s "$size_bytes" "$work/data/nbd-server.img"
	cat >"$work/nbd-server.conf" <<-EOF
		[generic]
		    port = $port
		    listenaddr = 127.0.0.1
		    allowlist = true
		[bench]
		    exportname = $work/data/nbd-server.img
		    flush = true
		    fua = true
	EOF
	# nbd-server -d serves a single connection and exits, so let it
	# daemonize and track it through its pid file (as scripts/bench does).
	nbd-server -C "$work/nbd-server.conf" -p "$work/nbd-server.pid" >"$res/nbd-server.log" 2>&1 ||
		die "nbd-server failed to start; see $res/nbd-server.log"
	for ((i = 0; i < 50; i++)); do
		[[ -s $work/nbd-server.pid ]] && break
		sleep 0.1
	done
	nbdsrv_pid=$(cat "$work/nbd-server.pid" 2>/dev/null || true)
	[[ -n $nbdsrv_pid ]] || die "nbd-server wrote no pid file"
	uri[nbd-server]=nbd://127.0.0.1:$port/bench
	wait_nbd "${uri[nbd-server]}" nbd-server
}

# start_floor: builds bench.d/floor.c and starts floor-r1 (one process) and
# floor-r2 (a primary and its secondary), each on its own file.
start_floor() {
	local bin=$work/bin p1 p2 p3
	mkdir -p "$bin"
	cc -O2 -o "$bin/floor" "$here/floor.c" 2>>"$res/floor.log" || die "cc floor.c failed; see $res/floor.log"
	p1=$(free_port) p2=$(free_port) p3=$(free_port)
	"$bin/floor" nbd "$p1" "$size_bytes" "$work/data/floor-r1.img" >>"$res/floor.log" 2>&1 &
	floor_pids+=($!)
	"$bin/floor" secondary "$p3" "$work/data/floor-r2b.img" >>"$res/floor.log" 2>&1 &
	floor_pids+=($!)
	"$bin/floor" nbd "$p2" "$size_bytes" "$work/data/floor-r2a.img" "$p3" >>"$res/floor.log" 2>&1 &
	floor_pids+=($!)
	uri[floor-r1]=nbd://127.0.0.1:$p1/floor
	uri[floor-r2]=nbd://127.0.0.1:$p2/floor
	wait_nbd "${uri[floor-r1]}" floor-r1
	wait_nbd "${uri[floor-r2]}" floor-r2
}

ctl() { timeout 40 "$storctl" --api "$api" --timeout 30s "$@"; }

# placement NAME: "PRIMARY EPOCH IN_SYNC_COUNT PARTITIONS" of volume NAME's
# first partition (and the partition count).
placement() {
	ctl -o json volume show "$1" 2>>"$res/cluster.log" | python3 -c '
import json, sys
v = json.load(sys.stdin)
p = v["partitions"][0]
print(p.get("primary") or "-", p.get("epoch", 0), len(p.get("in_sync") or []), len(v["partitions"]))' 2>>"$res/cluster.log"
}

# wait_ready NAME REPLICAS: until the partition has a primary and REPLICAS
# in-sync replicas, at most 60 s.
wait_ready() {
	local i prim epoch ins parts
	for ((i = 0; i < 300; i++)); do
		if read -r prim epoch ins parts < <(placement "$1") && [[ $prim != - && $ins == "$2" ]]; then
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

declare -A primary_at_start

start_cluster() {
	local bin=$work/bin name reps prim epoch ins parts addr
	if [[ -n ${STORD:-} && -n ${STORCTL:-} ]]; then
		stord=$STORD storctl=$STORCTL
		built="prebuilt $STORD"
	else
		command -v go >/dev/null || die "go not found (or set STORD and STORCTL)"
		echo "bench replicated: building stord and storctl" >&2
		mkdir -p "$bin"
		(cd "$repo" && go build -o "$bin/stord" ./cmd/stord && go build -o "$bin/storctl" ./cmd/storctl) ||
			die "build failed"
		stord=$bin/stord storctl=$bin/storctl
		built="built from checkout $(git -C "$repo" describe --always --dirty 2>/dev/null || echo '?')"
	fi
	# cluster-up binds fixed ports on $pfx.11 and .12: refuse to start
	# beside a cluster that already uses them.
	python3 - "$pfx" 2>/dev/null <<-'EOF' || die "ports 7480-7482/10809/3260 on $pfx.11 or $pfx.12 are in use; set CLUSTER_IP_PREFIX"
		import socket, sys
		for host in (sys.argv[1] + ".11", sys.argv[1] + ".12"):
		    for port in (7480, 7481, 7482, 10809, 3260):
		        s = socket.socket()
		        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
		        s.bind((host, port))
		        s.close()
	EOF
	cluster_started=1
	CLUSTER_IP_PREFIX=$pfx STORD=$stord STORCTL=$storctl CLUSTER_UP_TIMEOUT=60 \
		timeout -k 10 90 "$scripts/cluster-up" 2 "$cdir" >>"$res/cluster.log" 2>&1 ||
		die "cluster-up failed; see $res/cluster.log and $cdir/n*.log"
	api=http://$pfx.11:7480
	ctl cluster configure --lease-timeout 1500ms --suspect-timeout 750ms >>"$res/cluster.log" 2>&1 ||
		die "cluster configure failed; see $res/cluster.log"
	for name in r2 r1; do
		reps=${name#r}
		ctl volume create "$name" --size "$size_bytes" --partition-size "$size_bytes" --replicas "$reps" \
			--block-size 4096 >>"$res/cluster.log" 2>&1 || die "volume create $name failed; see $res/cluster.log"
	done
	for name in r2 r1; do
		reps=${name#r}
		wait_ready "$name" "$reps"
		read -r prim epoch ins parts < <(placement "$name") || die "volume show $name failed"
		addr=$(nbd_addr "$prim")
		[[ -n $addr ]] || die "no NBD address for node $prim"
		uri[$name]=nbd://$addr/$name
		primary_at_start[$name]="$prim epoch $epoch"
		echo "bench replicated: $name: primary $prim (epoch $epoch), $ins in sync; fio on ${uri[$name]}" >&2
		wait_nbd "${uri[$name]}" "$name"
	done
}

# cpu_ticks PID: user + system clock ticks PID has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# nodes_ticks: both nodes' ticks, "N1 N2".
nodes_ticks() { echo "$(cpu_ticks "$(cat "$cdir/n1.pid")") $(cpu_ticks "$(cat "$cdir/n2.pid")")"; }

# measure_idle: idle_ticks = the most either node used in 3 s, per 0.5 s.
measure_idle() {
	local a1 a2 b1 b2
	read -r a1 a2 < <(nodes_ticks)
	sleep 3
	read -r b1 b2 < <(nodes_ticks)
	idle_ticks=$(((b1 - a1 > b2 - a2 ? b1 - a1 : b2 - a2) / 6))
	echo "bench replicated: idle nodes use up to $((idle_ticks * 200 / $(getconf CLK_TCK))) % of a CPU" >&2
}

# settle: until both nodes used at most idle_ticks + 4 % of a CPU in each
# of 8 half seconds in a row (at most BENCH_SETTLE s); logs how long it took.
settle() {
	local quiet=0 start=$SECONDS a1 a2 b1 b2 lim
	lim=$((idle_ticks + $(getconf CLK_TCK) / 50))
	read -r a1 a2 < <(nodes_ticks)
	while ((quiet < 8 && SECONDS - start < settle_max)); do
		sleep 0.5
		read -r b1 b2 < <(nodes_ticks)
		if ((b1 - a1 <= lim && b2 - a2 <= lim)); then
			quiet=$((quiet + 1))
		else
			quiet=0
		fi
		a1=$b1 a2=$b2
	done
	settles+=("$((SECONDS - start))")
}

# fio_args ROW: the row's fio options.
fio_args() {
	case $1 in
	4k-randwrite-qd1) echo --rw=randwrite --bs=4k --iodepth=1 ;;
	4k-randwrite-qd32) echo --rw=randwrite --bs=4k --iodepth=32 ;;
	4k-randwrite-fsync) echo --rw=randwrite --bs=4k --iodepth=1 --fsync=1 ;;
	*) die "unknown row $1" ;;
	esac
}

echo "bench replicated: in $work: ${rounds} round(s) of ${runtime} s cells, volumes and region $size, cluster on $pfx.11-12" >&2
load_start=$(loadavg)
start_cluster
start_nbdsrv
start_floor
measure_idle
settles=()

for p in "${peers[@]}"; do
	check_space
	echo "bench replicated: preconditioning $p ($size)" >&2
	bounded 900 "$res/fio.log" fio --name=precondition --ioengine=nbd --uri="${uri[$p]}" --rw=write --bs=1m \
		--iodepth=8 --size="$size_bytes" --end_fsync=1 --output-format=json \
		--output="$res/precondition.$p.json" ||
		die "preconditioning $p failed; see $res/fio.log"
done

loads=()
for ((r = 1; r <= rounds; r++)); do
	# Rotate the target order each round so no target always runs first.
	order=()
	for ((i = 0; i < ${#peers[@]}; i++)); do
		order+=("${peers[$(((i + r - 1) % ${#peers[@]}))]}")
	done
	loads+=("round $r start: $(loadavg)")
	for row in "${rows[@]}"; do
		for p in "${order[@]}"; do
			check_space
			settle
			echo "bench replicated: round $r/$rounds $row $p (settled in ${settles[-1]} s)" >&2
			# shellcheck disable=SC2046 # word splitting of fio_args is intended
			bounded $((runtime + 120)) "$res/fio.log" fio --name="$row" --ioengine=nbd --uri="${uri[$p]}" \
				$(fio_args "$row") --size="$size_bytes" --time_based --runtime="$runtime" \
				--randrepeat=0 --norandommap --group_reporting --output-format=json \
				--output="$res/$row.$p.round$r.json" ||
				die "fio $row on $p failed; see $res/fio.log"
		done
	done
	kill -0 "$nbdsrv_pid" 2>/dev/null || die "nbd-server died; see $res/nbd-server.log"
done
load_end=$(loadavg)

# The primaries must not have moved during the run (a moved primary puts a
# node hop in front of every I/O of the cells after it), and r2 must still
# have both replicas in sync (else its later cells ran unreplicated).
moved=""
for name in r2 r1; do
	read -r prim epoch ins parts < <(placement "$name") || die "volume show $name failed at the end"
	if [[ "$prim epoch $epoch" != "${primary_at_start[$name]}" ]]; then
		moved+="$name: primary ${primary_at_start[$name]} at the start, $prim epoch $epoch at the end; "
	fi
	if [[ $ins != "${name#r}" ]]; then
		moved+="$name: $ins in sync at the end, want ${name#r}; "
	fi
done

{
	echo "## scripts/bench replicated — $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo
	echo "command: $cmdline"
	echo "machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r)"
	echo "filesystem: $(df -PT "$work" | awk 'NR==2 {print $2 " on " $1}') ($work)"
	echo "tools: $(fio --version), $(nbd-server -V 2>&1 | head -n1 | sed 's/This is //'), stord $built"
	echo
	IFS=,
	python3 - "$res" "${rows[*]}" "${peers[*]}" <<'EOF'
import json, os, statistics, sys

res, rows, peers = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")

def load(path):
    with open(path) as f:
        text = f.read()
    start = text.find("{")  # fio's nbd engine prints a line before the JSON
    if start < 0:
        raise ValueError(f"{path}: no JSON in fio output")
    return json.loads(text[start:])

cells = {}
for name in sorted(os.listdir(res)):
    parts = name[: -len(".json")].split(".") if name.endswith(".json") else []
    if len(parts) != 3 or parts[0] == "precondition":
        continue
    row, peer, _ = parts
    job = load(os.path.join(res, name))["jobs"][0]
    if job.get("error"):
        sys.exit(f"{name}: fio job error {job['error']}")
    w = job["write"]
    pct = w["clat_ns"].get("percentile", {})
    if row.endswith("fsync") and "sync" in job:
        pct = job["sync"]["lat_ns"].get("percentile", pct)
    cells.setdefault((row, peer), []).append(
        (w["iops"], pct.get("50.000000", 0) / 1e3, pct.get("99.000000", 0) / 1e3))

med = {k: tuple(statistics.median(c[i] for c in v) for i in range(3)) for k, v in cells.items()}
nrounds = sorted({len(v) for v in cells.values()})

def kfmt(v):
    if v >= 100_000: return f"{v / 1000:.0f}k"
    if v >= 10_000: return f"{v / 1000:.1f}k"
    if v >= 1000: return f"{v / 1000:.2f}k"
    return f"{v:.0f}"

def nfmt(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"

def ratio(a, b):
    return a / b if b else float("nan")

head = ["row"]
for p in peers:
    head += [f"{p} IOPS", "p50 µs", "p99 µs"]
head += ["r2/r1 IOPS", "r2/r1 p50", "r2/nbd-server IOPS", "floor r2/r1 p50"]
lines = [head]
for row in rows:
    line = [row]
    for p in peers:
        m = med.get((row, p))
        line += ["-"] * 3 if m is None else [kfmt(m[0]), nfmt(m[1]), nfmt(m[2])]
    r2, r1, ns = med.get((row, "r2")), med.get((row, "r1")), med.get((row, "nbd-server"))
    line.append(f"{ratio(r2[0], r1[0]):.2f}" if r2 and r1 else "-")
    line.append(f"{ratio(r2[1], r1[1]):.2f}" if r2 and r1 else "-")
    line.append(f"{ratio(r2[0], ns[0]):.2f}" if r2 and ns else "-")
    f2, f1 = med.get((row, "floor-r2")), med.get((row, "floor-r1"))
    line.append(f"{ratio(f2[1], f1[1]):.2f}" if f2 and f1 and not row.endswith("qd32") else "-")
    lines.append(line)
widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
fmt = lambda l: "| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |"
print(fmt(lines[0]))
print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
for l in lines[1:]:
    print(fmt(l))
print()
print(f"Medians over {'/'.join(map(str, nrounds))} round(s). Latency is fio's completion latency "
      "(the fsync row: the flush's latency). r2: 2 replicas, r1: 1 replica (unreplicated), "
      "both stor `stord run` volumes on a 2-node loopback cluster; nbd-server: Debian's, on a file; "
      "floor-r2/floor-r1: bench.d/floor.c, the bare C server with and without a second process to forward to "
      "(one request at a time: its QD32 cells are no floor).")
print()

def target(label, row, idx, cmp, bound, floored=False):
    r2, r1 = med.get((row, "r2")), med.get((row, "r1"))
    if not r2 or not r1:
        print(f"{label}: no figure")
        return
    x = ratio(r2[idx], r1[idx])
    met = x >= bound if cmp == ">=" else x <= bound
    f2, f1 = med.get((row, "floor-r2")), med.get((row, "floor-r1"))
    floor = ""
    if floored and f2 and f1:
        fx = ratio(f2[idx], f1[idx])
        fmet = fx >= bound if cmp == ">=" else fx <= bound
        floor = f"; the bare floor's r2/r1 = {fx:.2f}" + ("" if fmet else " (the bare floor misses it too on this machine)")
    print(f"{label}: r2/r1 = {x:.2f} ({'MET' if met else 'NOT MET'}){floor}")

target("2-replica 4k randwrite QD32 IOPS >= 0.6x unreplicated", "4k-randwrite-qd32", 0, ">=", 0.6)
target("QD1 p50 latency <= 2x unreplicated", "4k-randwrite-qd1", 1, "<=", 2.0, floored=True)
EOF
	unset IFS
	echo
	for name in r2 r1; do
		echo "$name: primary ${primary_at_start[$name]}, fio on ${uri[$name]}"
	done
	if [[ -n $moved ]]; then
		echo "warning: the placement changed during the run (${moved%; }): the cells after the change measured something else"
	fi
	printf 'load average (1/5/15 min): start %s; ' "$load_start"
	printf '%s; ' "${loads[@]}"
	printf 'end %s\n' "$load_end"
	if awk -v n="$(nproc)" '{exit !($1 > n || $4 > n)}' <<<"$load_start $load_end"; then
		echo "warning: load average above the CPU count during the run; other work shared the machine, so treat ratios as rough"
	fi
	echo "cells: ${runtime} s each, ${rounds} round(s) rotating the target order, region $size of each target, fio nbd engine, one job and connection per cell; lease 1500ms, suspect 750ms"
	echo "settling before each cell (s, at most $settle_max): ${settles[*]} (idle: up to $((idle_ticks * 200 / $(getconf CLK_TCK))) % of a CPU per node)"
} | tee "$res/table.md"
