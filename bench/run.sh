#!/usr/bin/env bash
# Runs the backup benchmark: Cairn, restic and borg side by side on the corpus built by
# bench/make-corpus.sh, in one run, and reports every tool relative to restic.
#
#   bench/run.sh [WORKDIR]                  (WORKDIR defaults to bench/work, gitignored)
#
# Environment:
#   BENCH_SIZE=4G|512M              corpus disk size (512M: quick smoke run)
#   BENCH_TOOLS="cairn restic borg" tools to run
#   BENCH_RUNS=3                    repetitions; the report gives the median of each number.
#                                   The tool order rotates from one repetition to the next.
#   BENCH_WARMUP=1                  one extra, unreported repetition first (0: none)
#   CAIRN_BACKUP_FLAGS="--no-skip-free"  flags for every Cairn backup. The default reads what
#                                   restic and borg read (the whole image), so the restore is
#                                   byte-equal to the source and the comparison is like for like;
#                                   "" measures Cairn with free-space skipping (the restore
#                                   then differs from the source in guest-free blocks only).
#   BENCH_CHUNK_SIZES="256K 1M 4M"  optional: also back up base+clone+day2 with Cairn
#                                   repositories of these chunk sizes (once, not repeated)
#
# Per tool and repetition, with a fresh encrypted repository under WORKDIR/repos and the page
# cache dropped before every timed step:
#   backup base.raw; backup clone.raw (same repository); backup day2.raw (day 2 of the base VM);
#   repository size after each backup (du -sb); restore the day-2 snapshot to a file; verify all
#   data (check --read-data / --verify-data); byte-compare the restore with day2.raw (a mismatch
#   fails the run).
# Plus the machine floor (cold read and sha256 of base.raw, openssl sha256 speed) and Cairn's
# qcow2 input path (base.qcow2 then day2.qcow2 into a separate repository).
#
# Results: WORKDIR/results.md (also printed) and WORKDIR/results.json, with copies named
# results-$BENCH_SIZE.{md,json}. Tool output goes to WORKDIR/logs/runN/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WORKDIR=$(realpath -m "${1:-$BENCH_DIR/work}")
BENCH_TOOLS=${BENCH_TOOLS:-"cairn restic borg"}
BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_WARMUP=${BENCH_WARMUP:-1}
BENCH_CHUNK_SIZES=${BENCH_CHUNK_SIZES:-}
CAIRN_BACKUP_FLAGS=${CAIRN_BACKUP_FLAGS---no-skip-free}
CORPUS=$WORKDIR/corpus-$BENCH_SIZE
REPOS=$WORKDIR/repos
RESTORES=$WORKDIR/restore
LOGS_ROOT=$WORKDIR/logs
ROWS=$WORKDIR/rows.tsv      # run  step  tool  wall_s  cpu_s  rss_mib  cache     (timed steps)
SIZES=$WORKDIR/sizes.tsv    # run  tool  after  bytes                           (repository sizes)
NOTES=$WORKDIR/notes.txt    # free-form lines copied into the report

[[ $EUID -eq 0 ]] || die "run as root (page-cache dropping, corpus loop mounts)"
for t in $BENCH_TOOLS; do
    [[ $t == cairn || $t == restic || $t == borg ]] || die "unknown tool '$t' in BENCH_TOOLS"
done
[[ $BENCH_RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer"
[[ $BENCH_WARMUP == 0 || $BENCH_WARMUP == 1 ]] || die "BENCH_WARMUP must be 0 or 1"
has_tool() { [[ " $BENCH_TOOLS " == *" $1 "* ]]; }

# Encryption on for every tool; the passwords only protect throw-away repositories.
export RESTIC_PASSWORD=cairn-bench CAIRN_PASSWORD=cairn-bench BORG_PASSPHRASE=cairn-bench
# restic's cache and borg's cache/keys/security dirs live inside the repositories directory, so
# every repetition starts without them.
export RESTIC_CACHE_DIR=$REPOS/restic-cache BORG_BASE_DIR=$REPOS/borg-home

need /usr/bin/time time
need openssl openssl
need cmp diffutils
has_tool restic && need restic restic
has_tool borg && need borg borgbackup

# --- corpus -----------------------------------------------------------------------------------

"$BENCH_DIR/make-corpus.sh" "$WORKDIR"
# shellcheck source=/dev/null
source "$CORPUS/corpus.info"

rm -rf "$REPOS" "$RESTORES" "$LOGS_ROOT"
mkdir -p "$REPOS" "$RESTORES" "$LOGS_ROOT"
: >"$ROWS"; : >"$SIZES"; : >"$NOTES"
note() { echo "$*" >>"$NOTES"; log "$*"; }
LOGS=$LOGS_ROOT

# --- cairn binary -----------------------------------------------------------------------------

CAIRN=$REPO_ROOT/.build-bench/release/cairn
if has_tool cairn; then
    log "building cairn (swift build -c release --static-swift-stdlib --scratch-path .build-bench)"
    if ! (cd "$REPO_ROOT" && swift build -c release --static-swift-stdlib --scratch-path .build-bench) >"$LOGS/cairn-build.log" 2>&1; then
        tail -n 20 "$LOGS/cairn-build.log" >&2
        note "Cairn skipped: the release build failed (see logs/cairn-build.log)."
        BENCH_TOOLS=${BENCH_TOOLS//cairn/}
    else
        # The CLI must offer the commands this script uses.
        help=$("$CAIRN" --help 2>&1 || true)
        for cmd in init backup snapshots restore check stats; do
            if ! grep -qw -- "$cmd" <<<"$help"; then
                note "Cairn skipped: 'cairn --help' does not list the '$cmd' command (CLI not ready)."
                BENCH_TOOLS=${BENCH_TOOLS//cairn/}
                break
            fi
        done
    fi
fi
read -r -a TOOLS <<<"$BENCH_TOOLS"
(( ${#TOOLS[@]} > 0 )) || die "no tool left to run"

# --- timing -----------------------------------------------------------------------------------

RUN=0   # current repetition

# timed STEP TOOL CMD...: drops the page cache, runs CMD under /usr/bin/time with its output in
# $LOGS, and appends a row (wall s, user+sys CPU s, peak RSS MiB) to $ROWS. Fails the run when
# CMD fails.
timed() {
    local step=$1 tool=$2; shift 2
    local name=${tool}-${step//[^A-Za-z0-9.]/-}
    local out=$LOGS/$name.log tf=$LOGS/$name.time cache=cold
    drop_caches || cache=warm
    log "run $RUN $tool: $step"
    if ! /usr/bin/time -f '%e %U %S %M' -o "$tf" "$@" >"$out" 2>&1; then
        tail -n 20 "$out" >&2
        die "$tool: '$step' failed (log: $out)"
    fi
    local wall user sys rss
    read -r wall user sys rss < <(tail -n 1 "$tf")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$RUN" "$step" "$tool" "$wall" \
        "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')" \
        "$(awk -v k="$rss" 'BEGIN { printf "%.0f", k / 1024 }')" "$cache" >>"$ROWS"
    log "  $wall s wall, $user+$sys s CPU, $(( rss / 1024 )) MiB peak RSS"
}

# same_as_day2 TOOL FILE: the restored image must be byte-identical to day2.raw.
same_as_day2() {
    [[ -f $2 ]] || die "$1: restored file $2 not found"
    if ! cmp "$2" "$CORPUS/day2.raw" >"$LOGS/$1-cmp.log" 2>&1; then
        cat "$LOGS/$1-cmp.log" >&2
        die "$1: restored day-2 image differs from day2.raw (run $RUN)"
    fi
    log "$1: restore is byte-identical to day2.raw"
}

# repo_size TOOL AFTER DIR: records the repository size after a backup.
repo_size() { printf '%s\t%s\t%s\t%s\n' "$RUN" "$1" "$2" "$(du -sb "$3" | cut -f1)" >>"$SIZES"; }

# --- machine floor ----------------------------------------------------------------------------

run_floor() {
    timed "read base.raw (cat)" floor sh -c 'cat "$1" >/dev/null' sh "$CORPUS/base.raw"
    timed "sha256 base.raw (openssl dgst)" floor openssl dgst -sha256 "$CORPUS/base.raw"
}

# --- restic -----------------------------------------------------------------------------------

# restic 0.14: repository format 2 (compression auto), AES-256-CTR + Poly1305 encryption.
# `restic restore` has no sparse mode in 0.14: it writes the whole 4 GiB, zeros included.
run_restic() {
    local repo=$REPOS/restic out=$RESTORES/restic
    restic init --repository-version 2 -r "$repo" >"$LOGS/restic-init.log" 2>&1
    timed "backup base" restic restic -r "$repo" backup "$CORPUS/base.raw"
    repo_size restic base "$repo"
    timed "backup clone" restic restic -r "$repo" backup "$CORPUS/clone.raw"
    repo_size restic clone "$repo"
    timed "backup day2" restic restic -r "$repo" backup "$CORPUS/day2.raw"
    repo_size restic day2 "$repo"
    timed "restore day2" restic restic -r "$repo" restore latest --path "$CORPUS/day2.raw" --target "$out"
    timed "verify" restic restic -r "$repo" check --read-data
    same_as_day2 restic "$out$CORPUS/day2.raw"
    rm -rf "$out"
}

# --- borg -------------------------------------------------------------------------------------

# borg 1.2: repokey encryption (AES-256-CTR + HMAC-SHA256), zstd level 3 compression (borg's
# default would be lz4), default buzhash chunker (~2 MiB chunks).
run_borg() {
    local repo=$REPOS/borg out=$RESTORES/borg
    borg init --encryption repokey "$repo" >"$LOGS/borg-init.log" 2>&1
    timed "backup base" borg borg create --compression zstd,3 "$repo::base" "$CORPUS/base.raw"
    repo_size borg base "$repo"
    timed "backup clone" borg borg create --compression zstd,3 "$repo::clone" "$CORPUS/clone.raw"
    repo_size borg clone "$repo"
    timed "backup day2" borg borg create --compression zstd,3 "$repo::day2" "$CORPUS/day2.raw"
    repo_size borg day2 "$repo"
    mkdir -p "$out"
    # borg stores paths without the leading '/' and extracts into the current directory.
    timed "restore day2" borg env -C "$out" borg extract --sparse "$repo::day2"
    timed "verify" borg borg check --verify-data "$repo"
    same_as_day2 borg "$out$CORPUS/day2.raw"
    rm -rf "$out"
}

# --- cairn ------------------------------------------------------------------------------------

# Cairn defaults: AES-256-GCM, 1 MiB fixed chunks, zstd level 3. All three images are disk
# "disk0": base and day2 are two days of VM "base", clone is VM "clone".
run_cairn() {
    local repo=$REPOS/cairn out=$RESTORES/cairn
    mkdir -p "$out"
    CAIRN_REPO=$repo "$CAIRN" init >"$LOGS/cairn-init.log" 2>&1
    timed "backup base" cairn env CAIRN_REPO="$repo" "$CAIRN" backup $CAIRN_BACKUP_FLAGS --vm base disk0="$CORPUS/base.raw"
    repo_size cairn base "$repo"
    timed "backup clone" cairn env CAIRN_REPO="$repo" "$CAIRN" backup $CAIRN_BACKUP_FLAGS --vm clone disk0="$CORPUS/clone.raw"
    repo_size cairn clone "$repo"
    timed "backup day2" cairn env CAIRN_REPO="$repo" "$CAIRN" backup $CAIRN_BACKUP_FLAGS --vm base disk0="$CORPUS/day2.raw"
    repo_size cairn day2 "$repo"
    CAIRN_REPO=$repo "$CAIRN" snapshots --json >"$LOGS/cairn-snapshots.json" 2>&1 || true
    CAIRN_REPO=$repo "$CAIRN" stats --json >"$LOGS/cairn-stats.json" 2>&1 || true
    timed "restore day2" cairn env CAIRN_REPO="$repo" "$CAIRN" restore latest --vm base --disk disk0 \
        --to "$out/day2.raw" --format raw
    same_as_day2 cairn "$out/day2.raw"
    rm -f "$out/day2.raw"
    # The same restore without the final fsync: what restic 0.14 and qemu-img convert do.
    timed "restore day2 --no-sync" cairn env CAIRN_REPO="$repo" "$CAIRN" restore latest --vm base --disk disk0 \
        --to "$out/day2.raw" --format raw --no-sync
    same_as_day2 cairn "$out/day2.raw"
    timed "verify" cairn env CAIRN_REPO="$repo" "$CAIRN" check --read-data
    rm -rf "$out"

    # qcow2 input: the same two days from qcow2 images, into a separate repository.
    repo=$REPOS/cairn-qcow2
    CAIRN_REPO=$repo "$CAIRN" init >"$LOGS/cairn-qcow2-init.log" 2>&1
    timed "backup base.qcow2" cairn-qcow2 env CAIRN_REPO="$repo" "$CAIRN" backup $CAIRN_BACKUP_FLAGS --vm base disk0="$CORPUS/base.qcow2"
    repo_size cairn-qcow2 base "$repo"
    timed "backup day2.qcow2" cairn-qcow2 env CAIRN_REPO="$repo" "$CAIRN" backup $CAIRN_BACKUP_FLAGS --vm base disk0="$CORPUS/day2.qcow2"
    repo_size cairn-qcow2 day2 "$repo"
    mkdir -p "$out"
    timed "restore day2 to raw" cairn-qcow2 env CAIRN_REPO="$repo" "$CAIRN" restore latest --vm base \
        --disk disk0 --to "$out/day2.raw" --format raw
    same_as_day2 cairn-qcow2 "$out/day2.raw"
    rm -rf "$out"
}

# run_cairn_chunk SIZE: the three backups into a repository with --chunk-size SIZE.
run_cairn_chunk() {
    local size=$1 repo=$REPOS/cairn-chunk-$1 tool=cairn-chunk-$1
    CAIRN_REPO=$repo "$CAIRN" init --chunk-size "$size" >"$LOGS/$tool-init.log" 2>&1
    timed "backup base" "$tool" env CAIRN_REPO="$repo" "$CAIRN" backup $CAIRN_BACKUP_FLAGS --vm base disk0="$CORPUS/base.raw"
    repo_size "$tool" base "$repo"
    timed "backup clone" "$tool" env CAIRN_REPO="$repo" "$CAIRN" backup $CAIRN_BACKUP_FLAGS --vm clone disk0="$CORPUS/clone.raw"
    repo_size "$tool" clone "$repo"
    timed "backup day2" "$tool" env CAIRN_REPO="$repo" "$CAIRN" backup $CAIRN_BACKUP_FLAGS --vm base disk0="$CORPUS/day2.raw"
    repo_size "$tool" day2 "$repo"
    rm -rf "$repo"
}

# --- the runs ---------------------------------------------------------------------------------

# Warm-up: on the 2-vCPU test VM the first large reads after a build or an idle period were much
# slower (a cold `cat` of base.raw: 9.9 s, later 1.3 s; in one smoke run every tool's first
# repetition was 30-50 % slower), so by default repetition 0 runs everything once and the report
# ignores it.
for (( RUN = 1 - BENCH_WARMUP; RUN <= BENCH_RUNS; RUN++ )); do
    LOGS=$LOGS_ROOT/run$RUN
    mkdir -p "$LOGS"
    rm -rf "${REPOS:?}"/* "${RESTORES:?}"/*
    run_floor
    # Rotate the tool order so no tool always runs first (or right after another).
    n=${#TOOLS[@]}
    for (( i = 0; i < n; i++ )); do
        "run_${TOOLS[(i + RUN + n - 1) % n]}"
    done
done

if [[ -n $BENCH_CHUNK_SIZES ]] && has_tool cairn; then
    RUN=1
    LOGS=$LOGS_ROOT/chunk-sizes
    mkdir -p "$LOGS"
    for size in $BENCH_CHUNK_SIZES; do run_cairn_chunk "$size"; done
fi

# --- report -----------------------------------------------------------------------------------

[[ $DROP_CACHES_OK == yes ]] || note "The page cache could NOT be dropped: timings are warm-cache."
(( BENCH_WARMUP == 0 )) || note "A first warm-up repetition ran and is not reported."
(( BENCH_RUNS == 1 )) || note "Each number is the median of $BENCH_RUNS runs (peak RSS: the highest); the tool order rotated between runs."

# openssl's SHA-256 speed on 1 MiB blocks, in bytes/s: the time to hash just the used data (what
# a sparse-aware tool must at least read and hash) follows from it.
SHA256_BPS=$(openssl speed -seconds 3 -bytes 1048576 -evp sha256 2>/dev/null |
    awk '$1 == "sha256" { v = $NF; sub(/k$/, "", v); printf "%.0f\n", v * 1000 }')

cairn_version=""
if has_tool cairn; then
    # The binary is built from the working tree: say so when Sources/ differs from HEAD.
    rev=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    [[ -z $(git -C "$REPO_ROOT" status --porcelain -- Sources Package.swift 2>/dev/null) ]] || rev="$rev + uncommitted changes"
    cairn_version="$("$CAIRN" --version 2>/dev/null | sed "s/^cairn //" || true) ($rev)"
fi

awk -F'\t' -f "$BENCH_DIR/report.awk" \
    -v md="$WORKDIR/results.md" -v js="$WORKDIR/results.json" -v notes_file="$NOTES" \
    -v date="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -v runs="$BENCH_RUNS" -v tools="$BENCH_TOOLS" \
    -v size="$CORPUS_SIZE" -v size_bytes="$CORPUS_SIZE_BYTES" \
    -v base_used="$CORPUS_BASE_FS_USED" -v base_alloc="$CORPUS_BASE_ALLOCATED" \
    -v clone_used="$CORPUS_CLONE_FS_USED" -v clone_alloc="$CORPUS_CLONE_ALLOCATED" \
    -v day2_used="$CORPUS_DAY2_FS_USED" -v day2_alloc="$CORPUS_DAY2_ALLOCATED" \
    -v rewritten="$CORPUS_DAY2_REWRITTEN" -v sha_bps="${SHA256_BPS:-0}" \
    -v cpu="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" -v ncpu="$(nproc)" \
    -v mem="$(awk '/^MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" -v kernel="$(uname -r)" \
    -v v_restic="$(has_tool restic && restic version | awk '{ print $2 }')" \
    -v v_borg="$(has_tool borg && borg --version | awk '{ print $2 }')" \
    -v v_cairn="$cairn_version" -v v_openssl="$(openssl version | awk '{ print $2 }')" \
    -v cache="$DROP_CACHES_OK" \
    "$ROWS" "$SIZES"

cp "$WORKDIR/results.md" "$WORKDIR/results-$BENCH_SIZE.md"
cp "$WORKDIR/results.json" "$WORKDIR/results-$BENCH_SIZE.json"
echo
cat "$WORKDIR/results.md"
log "results: $WORKDIR/results.md, $WORKDIR/results.json"
