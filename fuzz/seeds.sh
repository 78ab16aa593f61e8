#!/usr/bin/env bash
# Makes small seed images for the fuzz targets with qemu-img (one directory per target).
set -euo pipefail
cd "$(dirname "$0")/.."
S=${FUZZ_WORK:-fuzz/work}/seeds
W=${FUZZ_WORK:-fuzz/work}/seedtmp
mkdir -p "$W"
targets=("$@")
raw=$W/data.raw
if [ ! -f "$raw" ]; then
    truncate -s 1M "$raw"
    printf 'cairn fuzz seed data' | dd of="$raw" bs=1 seek=4096 conv=notrunc status=none
    head -c 8192 /dev/urandom | dd of="$raw" bs=1 seek=300000 conv=notrunc status=none
fi
mk() {  # mk TARGET NAME qemu-img-args...
    local t=$1 n=$2; shift 2
    mkdir -p "$S/$t"
    [ -f "$S/$t/$n" ] || qemu-img convert -q -f raw "$raw" "$@" "$S/$t/$n"
}
for t in "${targets[@]}"; do
    case $t in
        qcow2)
            mk qcow2 v2-4k.qcow2 -O qcow2 -o compat=0.10,cluster_size=4096
            mk qcow2 v3-64k.qcow2 -O qcow2 -o compat=1.1
            mk qcow2 v3-zlib.qcow2 -c -O qcow2 -o compat=1.1,cluster_size=4096
            mk qcow2 v3-zstd.qcow2 -c -O qcow2 -o compat=1.1,compression_type=zstd,cluster_size=4096 ;;
        vmdk)
            mk vmdk sparse.vmdk -O vmdk -o subformat=monolithicSparse
            mk vmdk stream.vmdk -O vmdk -o subformat=streamOptimized ;;
        vhd)
            mk vhd dynamic.vhd -O vpc -o subformat=dynamic
            mk vhd fixed.vhd -O vpc -o subformat=fixed ;;
        vhdx)
            # Real images cut into the page list fuzz/targets/vhdx.swift expects.
            for sub in dynamic fixed; do
                img=$W/$sub.vhdx
                [ -f "$img" ] || qemu-img convert -q -f raw "$raw" -O vhdx -o subformat=$sub,block_size=1M "$img"
                mkdir -p "$S/vhdx"
                out=$S/vhdx/$sub.pages
                if [ ! -f "$out" ]; then
                    : >"$out.tmp"
                    for off in 0 16 32 48 64 256 512 768 784 1024 1040 1056 1072; do   # in 4 KiB pages
                        dd if="$img" bs=4096 skip=$off count=1 status=none >>"$out.tmp"
                    done
                    mv "$out.tmp" "$out"
                fi
            done ;;
        *)
            # Other targets (the file-system readers) bring their own seed script.
            mkdir -p "$S/$t"
            if [ -f "fuzz/seeds.d/$t.sh" ]; then SEEDS="$S/$t" WORK="$W" bash "fuzz/seeds.d/$t.sh"; fi ;;
    esac
done
