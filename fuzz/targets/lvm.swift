// libFuzzer target: the LVM2 physical-volume reader (label, PV header, metadata area header,
// metadata text parser, volume group model) and the logical-volume block source. It must never
// crash, trap, hang or allocate without bound: every malformed input is a thrown CairnError.
//
// Input encoding: the input is the first bytes of a 64 MiB physical volume; everything after
// the input reads as zeros. A real PV keeps its label in sector 1, the metadata area header at
// 4 KiB and the metadata text a little after it, so the first 8-20 KiB of a real image (see
// fuzz/seeds.d/lvm.sh) describe a whole volume group whose extents (from 1 MiB on) are zeros.
//
// Builds either way: compiled into one module together with the CairnCore and GuestFS
// sources (nothing to import), or linked against those modules as fuzz/build.sh does.
#if canImport(GuestFS)
import CairnCore
import GuestFS
#endif

let lvmFuzzVolumeSize: UInt64 = 64 << 20

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzLVM(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let input = Array(UnsafeRawBufferPointer(start: data, count: size))
    let volume = MemoryBlockSource(input, name: "fuzz-pv", zeroPaddedTo: lvmFuzzVolumeSize)
    _ = LVMPhysicalVolume.probe(volume)
    guard let pv = try? LVMPhysicalVolume(source: volume) else { return 0 }
    var last: UInt64 = 0
    for r in pv.unusedRanges() {
        precondition(r.lowerBound >= last && r.lowerBound < r.upperBound, "unused ranges out of order, overlapping or empty")
        precondition(r.upperBound <= volume.size, "unused range \(r) past the volume end")
        precondition(r.lowerBound >= 2048, "unused range \(r) covers the label")
        last = r.upperBound
    }
    guard let vg = pv.volumeGroup else { return 0 }
    let piece = 4096
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: piece, alignment: 16)
    defer { buffer.deallocate() }
    for lv in vg.logicalVolumes.prefix(256) {
        guard let src = try? LogicalVolumeSource(volumeGroup: vg, logicalVolume: lv.name, physicalVolumes: [pv]) else { continue }
        precondition(src.size == lv.size, "LV source size differs from the LV size")
        let n = Int(min(UInt64(piece), src.size))
        let window = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
        _ = try? src.read(into: window, at: 0)
        _ = try? src.read(into: window, at: src.size - UInt64(n))
        // Walk the segments: a read at each segment start.
        for seg in lv.segments.prefix(64) {
            let at = seg.startExtent &* vg.extentSize
            if at < src.size {
                _ = try? src.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(min(512, src.size - at))]), at: at)
            }
        }
        if let ext = try? src.extents(in: 0..<src.size) {
            var end: UInt64 = 0
            for e in ext {
                precondition(e.offset == end, "LV extents leave a gap or overlap")
                end = e.end
            }
            precondition(ext.isEmpty || end == src.size, "LV extents do not cover the LV")
        }
    }
    return 0
}
