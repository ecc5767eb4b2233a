#!/usr/bin/env bash
# scripts/bench.d/iscsi.sh — run as `scripts/bench iscsi`: stor's iSCSI
# target (a real `stord dev`, volume "bench", 4096-byte blocks) against
# Debian's tgtd (file-backed LUN, 4096-byte blocks, on the same filesystem),
# side by side in one run, with userspace initiators only (libiscsi's
# iscsi-perf and qemu-img bench over iscsi://).
#
# Rows (qemu-img bench is sequential: -S equals -s; its ops/s is the request
# count over the run time it reports):
#
#   row                    tool            options
#   4k-randread-qd1        iscsi-perf      -r -b 1 -m 1   (IOPS average over the cell)
#   4k-randread-qd32       iscsi-perf      -r -b 1 -m 32
#   4k-read-qd1            qemu-img bench  -s 4k -S 4k -d 1
#   4k-read-qd32           qemu-img bench  -s 4k -S 4k -d 32
#   4k-write-qd1           qemu-img bench  -w -s 4k -S 4k -d 1
#   4k-write-qd32          qemu-img bench  -w -s 4k -S 4k -d 32
#   1m-read-qd8            qemu-img bench  -s 1M -S 1M -d 8
#   1m-write-qd8           qemu-img bench  -w -s 1M -S 1M -d 8
#   4k-write-flush-qd1     qemu-img bench  -w -s 4k -S 4k -d 1 --flush-interval=1
#
# Both targets first get their whole LUN (BENCH_SIZE) written, so reads read
# data. Rounds alternate which peer goes first; the table gives the median
# ops/s per row with min..max over rounds and the ratio stor/tgtd of medians.
#
# Environment:
#   BENCH_DIR     parent of the run's temp dir (default /tmp)
#   BENCH_SIZE    LUN size of both targets (default 1G; 256M with BENCH_QUICK=1)
#   BENCH_ROUNDS  rounds (default 3; 1 with BENCH_QUICK=1)
#   BENCH_QUICK=1 one round of short cells
#   BENCH_KEEP=1  keep the backing file and stor's data dir
#   STORD, STORCTL prebuilt binaries (default: go build from this checkout)
#
# Needs root (tgtd), tgtd/tgtadm (tgt), iscsi-perf (libiscsi-bin), qemu-img
# with the iscsi driver (qemu-block-extra), python3. Every process started is
# stopped on exit (tgtd ignores SIGTERM: its target and system are deleted,
# then it is killed); every wait and every cell is bounded.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

cmdline=""
for v in BENCH_DIR BENCH_SIZE BENCH_ROUNDS BENCH_QUICK BENCH_KEEP STORD STORCTL; do
	if [[ -n ${!v:-} ]]; then cmdline+="$v=$(printf %q "${!v}") "; fi
done
cmdline+="scripts/bench iscsi"

die() {
	echo "bench iscsi: $*" >&2
	exit 1
}

quick=${BENCH_QUICK:-0}
if [[ $quick == 1 ]]; then
	rounds=${BENCH_ROUNDS:-1} size=${BENCH_SIZE:-256M} perf_secs=3 scale=5
else
	rounds=${BENCH_ROUNDS:-3} size=${BENCH_SIZE:-1G} perf_secs=8 scale=1
fi
[[ $rounds =~ ^[0-9]+$ && $rounds -ge 1 && $rounds -le 20 ]] || die "BENCH_ROUNDS must be 1..20"
[[ $(id -u) == 0 ]] || die "tgtd needs root"
PATH=$PATH:/usr/sbin:/sbin
for tool in tgtd tgtadm iscsi-perf qemu-img python3 truncate timeout; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install tgt libiscsi-bin qemu-utils qemu-block-extra)"
done

parent=${BENCH_DIR:-/tmp}
mkdir -p "$parent"
work=$(mktemp -d "$parent/stor-bench-iscsi.XXXXXX")
res=$work/results
mkdir -p "$res" "$work/data"

stord_pid="" tgtd_pid="" child_pid="" tgt_ctl=""

tgtadm_() { timeout 20 tgtadm -C "$tgt_ctl" --lld iscsi "$@"; }

cleanup() {
	local rc=$? i
	trap - EXIT INT TERM
	if [[ -n $child_pid ]]; then kill -INT "$child_pid" 2>/dev/null || true; fi
	if [[ -n $stord_pid ]] && kill -0 "$stord_pid" 2>/dev/null; then
		kill -TERM "$stord_pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			kill -0 "$stord_pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$stord_pid" 2>/dev/null || true
	fi
	if [[ -n $tgtd_pid ]] && kill -0 "$tgtd_pid" 2>/dev/null; then
		tgtadm_ --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
		tgtadm_ --op delete --mode system >/dev/null 2>&1 || true
		for ((i = 0; i < 30; i++)); do
			kill -0 "$tgtd_pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$tgtd_pid" 2>/dev/null || true
	fi
	wait 2>/dev/null || true
	if [[ ${BENCH_KEEP:-0} != 1 ]]; then
		rm -rf "$work/data" "$work/bin"
	fi
	echo "bench iscsi: results in $res" >&2
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r port_nbd port_api port_stor port_tgt < <(python3 - <<'EOF'
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
EOF
)
# tgtd's -C is a small control-socket index, not a TCP port.
tgt_ctl=$((100 + $$ % 20000))

# bounded SECS LOG CMD...: CMD under timeout (signal $stop_sig, default
# TERM; KILL 10 s later), output to LOG, waited for in the background so
# signals to this script are handled at once.
bounded() {
	local secs=$1 log=$2
	shift 2
	timeout -s "${stop_sig:-TERM}" -k 10 "$secs" "$@" >"$log" 2>&1 &
	child_pid=$!
	local rc=0
	wait "$child_pid" || rc=$?
	child_pid=""
	return "$rc"
}

declare -A url

start_stor() {
	local bin=$work/bin stord storctl i
	if [[ -n ${STORD:-} && -n ${STORCTL:-} ]]; then
		stord=$STORD storctl=$STORCTL
	else
		command -v go >/dev/null || die "go not found (or set STORD and STORCTL)"
		echo "bench iscsi: building stord and storctl" >&2
		mkdir -p "$bin"
		(cd "$repo" && go build -o "$bin/stord" ./cmd/stord && go build -o "$bin/storctl" ./cmd/storctl) ||
			die "build failed"
		stord=$bin/stord storctl=$bin/storctl
	fi
	"$stord" dev --data "$work/data/stor" --nbd-listen "127.0.0.1:$port_nbd" --api-listen "127.0.0.1:$port_api" \
		--iscsi-listen "127.0.0.1:$port_stor" --no-default-volume >"$res/stor.log" 2>&1 &
	stord_pid=$!
	for ((i = 0; i < 150; i++)); do
		kill -0 "$stord_pid" 2>/dev/null || die "stord exited; see $res/stor.log"
		if timeout 5 "$storctl" --api "http://127.0.0.1:$port_api" status >/dev/null 2>&1; then break; fi
		sleep 0.2
	done
	((i < 150)) || die "stord API not up within 30 s; see $res/stor.log"
	timeout 30 "$storctl" --api "http://127.0.0.1:$port_api" volume create bench --size "$size" \
		--block-size 4096 >>"$res/stor.log" 2>&1 || die "volume create failed; see $res/stor.log"
	url[stor]=iscsi://127.0.0.1:$port_stor/iqn.2026-11.dev.stor:bench/0
}

start_tgtd() {
	local i img=$work/data/tgtd.img iqn=iqn.2026-11.dev.stor:tgtd-bench
	truncate -s "$size" "$img"
	tgtd -f -C "$tgt_ctl" --iscsi "portal=127.0.0.1:$port_tgt" >"$res/tgtd.log" 2>&1 &
	tgtd_pid=$!
	for ((i = 0; i < 100; i++)); do
		kill -0 "$tgtd_pid" 2>/dev/null || die "tgtd exited; see $res/tgtd.log"
		if tgtadm_ --op show --mode target >/dev/null 2>&1; then break; fi
		sleep 0.1
	done
	((i < 100)) || die "tgtd not up within 10 s; see $res/tgtd.log"
	tgtadm_ --op new --mode target --tid 1 -T "$iqn" || die "tgtadm new target"
	tgtadm_ --op new --mode logicalunit --tid 1 --lun 1 --backing-store "$img" --blocksize 4096 ||
		die "tgtadm new logicalunit"
	tgtadm_ --op bind --mode target --tid 1 -I ALL || die "tgtadm bind"
	url[tgtd]=iscsi://127.0.0.1:$port_tgt/$iqn/1
}

# qb ROW: the row's qemu-img bench options and request count.
qb() {
	local n4q1=$((20000 / scale)) n4q32=$((100000 / scale)) n1m=$((2000 / scale)) nfl=$((5000 / scale))
	case $1 in
	4k-read-qd1) echo "-c $n4q1 -d 1 -s 4k -S 4k" ;;
	4k-read-qd32) echo "-c $n4q32 -d 32 -s 4k -S 4k" ;;
	4k-write-qd1) echo "-w -c $n4q1 -d 1 -s 4k -S 4k" ;;
	4k-write-qd32) echo "-w -c $n4q32 -d 32 -s 4k -S 4k" ;;
	1m-read-qd8) echo "-c $n1m -d 8 -s 1M -S 1M" ;;
	1m-write-qd8) echo "-w -c $n1m -d 8 -s 1M -S 1M" ;;
	4k-write-flush-qd1) echo "-w -c $nfl -d 1 -s 4k -S 4k --flush-interval=1" ;;
	*) die "unknown row $1" ;;
	esac
}

# cell ROW PEER ROUND: runs one cell and sets val to its ops/s.
cell() {
	local row=$1 peer=$2 r=$3 log=$res/$1.$2.r$3.log v
	case $row in
	4k-randread-qd*)
		# iscsi-perf runs until SIGINT; it prints a running "iops average".
		stop_sig=INT bounded "$perf_secs" "$log" iscsi-perf -m "${row##*qd}" -b 1 -r "${url[$peer]}" || true
		v=$(grep -o 'iops average [0-9]*' "$log" | tail -n 1 | awk '{print $3}')
		;;
	*)
		local count
		# shellcheck disable=SC2046 # word splitting of qb is intended
		bounded 300 "$log" qemu-img bench -f raw -t none $(qb "$row") "${url[$peer]}" ||
			die "qemu-img bench $row on $peer failed; see $log"
		count=$(qb "$row" | awk '{for (i = 1; i < NF; i++) if ($i == "-c") print $(i + 1)}')
		v=$(awk -v n="$count" '/Run completed in/ {printf "%.0f", n / $4}' "$log")
		;;
	esac
	[[ -n $v ]] || die "no figure from $row on $peer; see $log"
	val=$v
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

rows=(4k-randread-qd1 4k-randread-qd32 4k-read-qd1 4k-read-qd32 4k-write-qd1 4k-write-qd32
	1m-read-qd8 1m-write-qd8 4k-write-flush-qd1)
peers=(stor tgtd)

echo "bench iscsi: in $work, $rounds round(s), LUNs of $size" >&2
load_start=$(loadavg)
start_stor
start_tgtd
for p in "${peers[@]}"; do
	echo "bench iscsi: preconditioning $p ($size)" >&2
	n=$(numfmt --from=iec "$size")
	bounded 900 "$res/precondition.$p.log" qemu-img bench -f raw -t none -w -c $((n >> 20)) -d 8 -s 1M -S 1M \
		"${url[$p]}" || die "preconditioning $p failed; see $res/precondition.$p.log"
done

: >"$res/cells"
loads=()
for ((r = 1; r <= rounds; r++)); do
	if ((r % 2)); then order=(stor tgtd); else order=(tgtd stor); fi
	loads+=("round $r: $(loadavg)")
	for row in "${rows[@]}"; do
		for p in "${order[@]}"; do
			echo "bench iscsi: round $r/$rounds $row $p" >&2
			cell "$row" "$p" "$r"
			echo "$row $p $r $val" >>"$res/cells"
			kill -0 "$stord_pid" 2>/dev/null || die "stord died during $row; see $res/stor.log"
			kill -0 "$tgtd_pid" 2>/dev/null || die "tgtd died during $row; see $res/tgtd.log"
		done
	done
done
load_end=$(loadavg)

{
	echo "## scripts/bench iscsi — $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo
	python3 - "$res/cells" "${rows[@]}" <<'EOF'
import sys, statistics
cells, rows = sys.argv[1], sys.argv[2:]
v = {}
for line in open(cells):
    row, peer, _, x = line.split()
    v.setdefault((row, peer), []).append(float(x))
def fmt(xs):
    return "%.0f (%.0f..%.0f)" % (statistics.median_low(xs), min(xs), max(xs))
print("| row | stor ops/s median (min..max) | tgtd ops/s median (min..max) | stor/tgtd |")
print("|---|---:|---:|---:|")
for r in rows:
    s, t = v[(r, "stor")], v[(r, "tgtd")]
    ratio = statistics.median_low(s) / statistics.median_low(t) if statistics.median_low(t) else float("nan")
    print("| %s | %s | %s | %.2f |" % (r, fmt(s), fmt(t), ratio))
EOF
	echo
	echo "machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r)"
	echo "filesystem: $(df -PT "$work" | awk 'NR==2 {print $2 " on " $1}') ($work)"
	echo "tools: $(qemu-img --version | head -n1), $(iscsi-perf 2>&1 | grep -m1 version || true), tgtd $(tgtadm --help 2>&1 | grep -o 'version [0-9.]*' | head -n1)"
	printf 'load average (1/5/15 min): start %s; ' "$load_start"
	printf '%s; ' "${loads[@]}"
	printf 'end %s\n' "$load_end"
	echo "rounds: $rounds, alternating which peer goes first; iscsi-perf cells ${perf_secs} s; qemu-img bench -f raw -t none, request counts divided by $scale"
	echo "command: $cmdline"
} | tee "$res/table.md"
