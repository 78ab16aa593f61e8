# Shared helpers for bench/make-corpus.sh and bench/run.sh. Sourced, not executed.
# shellcheck shell=bash

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)

# Corpus size: BENCH_SIZE=4G (default) or e.g. 512M for a quick smoke run.
BENCH_SIZE=${BENCH_SIZE:-4G}
BENCH_SIZE_BYTES=$(numfmt --from=iec "$BENCH_SIZE")

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# need CMD PACKAGE: installs PACKAGE with apt-get when CMD is not found.
need() {
    local cmd=$1 pkg=$2
    if command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd || -x /sbin/$cmd ]]; then
        return 0
    fi
    log "installing $pkg (for $cmd)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null
    fi
}

# mke2fs, sfdisk, losetup... live in /usr/sbin, which a non-login root shell may lack in PATH.
export PATH="$PATH:/usr/sbin:/sbin"

# prng_bytes SEED COUNT: COUNT deterministic pseudo-random (incompressible) bytes on stdout.
# AES-256-CTR keystream of zeros, keyed by SEED; same SEED gives the same bytes.
prng_bytes() {
    head -c "$2" /dev/zero |
        openssl enc -aes-256-ctr -nosalt -pbkdf2 -iter 1 -pass "pass:$1" 2>/dev/null
}

# needs_build OUT IN...: true when OUT is missing or older than any IN (make-style).
needs_build() {
    local out=$1; shift
    [[ -e $out ]] || return 0
    local in
    for in in "$@"; do [[ $in -nt $out ]] && return 0; done
    return 1
}

# drop_caches: cold page cache before a timed step. Returns 1 (and says so once) when not allowed.
DROP_CACHES_OK=unknown
drop_caches() {
    sync
    if echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then
        DROP_CACHES_OK=yes
        return 0
    fi
    if [[ $DROP_CACHES_OK != no ]]; then
        log "WARNING: cannot drop the page cache (not root or /proc/sys read-only); timings are warm-cache"
    fi
    DROP_CACHES_OK=no
    return 1
}

# Byte offset of the single ext4 partition inside the raw disk images.
PART_OFFSET=1048576
