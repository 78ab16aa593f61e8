#!/usr/bin/env bash
# Seeds for fuzz/targets/lvm.swift: real LVM2 physical volumes made by pvcreate/vgcreate/
# lvcreate on loop devices (activation off: no device-mapper needed), cut to their first bytes
# (label, PV header, metadata area header and the current metadata text), which is the
# target's input encoding. Needs root (losetup) and lvm2. Idempotent; the volume groups are
# removed and the loop devices detached in every outcome.
set -euo pipefail
: "${SEEDS:?}" "${WORK:?}"
mkdir -p "$SEEDS" "$WORK/lvm"
[ -f "$SEEDS/linear.pv" ] && [ -f "$SEEDS/striped-a.pv" ] && [ -f "$SEEDS/two-mdas.pv" ] && exit 0
export LVM_SUPPRESS_FD_WARNINGS=1
vg=cairnseed$$
devs=()
cleanup() {
    if [ ${#devs[@]} -gt 0 ]; then
        lvm vgremove --devices "$(IFS=,; echo "${devs[*]}")" --driverloaded n -f "$vg" >/dev/null 2>&1 || true
        for d in "${devs[@]}"; do losetup -d "$d" 2>/dev/null || true; done
    fi
    devs=()
}
trap cleanup EXIT

# cut IMAGE OUT: the first bytes up to the end of the first metadata area's current text.
cut() {
    local img=$1 out=$2
    local mda off size end
    mda=4096
    off=$(od -An -t u8 -j $((mda + 40)) -N 8 "$img" | tr -d ' ')
    size=$(od -An -t u8 -j $((mda + 48)) -N 8 "$img" | tr -d ' ')
    end=$((mda + off + size))
    [ "$end" -lt 65536 ] || end=65536
    head -c "$end" "$img" >"$out.tmp" && mv "$out.tmp" "$out"
}

# build NAME PVCREATE-ARGS SIZES... -- LVCREATE-COMMANDS (each as one string, {vg} {pv0} {pv1})
build() {
    local name=$1 pvargs=$2; shift 2
    local sizes=() imgs=()
    while [ "$1" != "--" ]; do sizes+=("$1"); shift; done
    shift
    local i=0
    for s in "${sizes[@]}"; do
        local img=$WORK/lvm/$name-$i.img
        rm -f "$img"; truncate -s "$s" "$img"
        imgs+=("$img")
        devs+=("$(losetup -f --show "$img")")
        i=$((i + 1))
    done
    local d="--devices $(IFS=,; echo "${devs[*]}") --driverloaded n"
    # shellcheck disable=SC2086
    lvm pvcreate -q $d $pvargs "${devs[@]}" >/dev/null 2>&1
    # shellcheck disable=SC2086
    lvm vgcreate -q $d "$vg" "${devs[@]}" >/dev/null 2>&1
    for c in "$@"; do
        c=${c//\{vg\}/$vg}; c=${c//\{pv0\}/${devs[0]}}; c=${c//\{pv1\}/${devs[1]:-}}
        # shellcheck disable=SC2086
        lvm ${c%% *} $d ${c#* } >/dev/null 2>&1
    done
    i=0
    for img in "${imgs[@]}"; do
        if [ ${#imgs[@]} -eq 1 ]; then cut "$img" "$SEEDS/$name.pv"; else cut "$img" "$SEEDS/$name-$(printf "\\x$(printf %x $((97 + i)))").pv"; fi
        i=$((i + 1))
    done
    cleanup
}

build linear "" 32M -- "lvcreate -an -Zn -y -L 8M -n one {vg}" "lvcreate -an -Zn -y -L 4M -n two {vg}" "lvextend -L +4M {vg}/one"
build striped "" 24M 24M -- "lvcreate -an -Zn -y -L 16M -i2 -I64k -n st {vg}" "lvcreate -an -Zn -y -L 4M -n lin {vg} {pv1}"
build two-mdas "--metadatacopies 2 --metadatasize 64k" 16M -- "lvcreate -an -Zn -y -L 4M -n a {vg}"
rm -rf "$WORK/lvm"
