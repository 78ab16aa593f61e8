// libFuzzer target for the VMDK reader (VMDKImage and everything below it).
//
// Built by fuzz/build.sh (CairnCore and DiskFormats compiled as modules with
// -sanitize=fuzzer,address and -package-name Cairn, so `package` API is visible).
//
// Each input is opened as a VMDK (sparse extent or descriptor). Extent files named by a
// descriptor are small zero-filled sources (plain names only; VMDKImage refuses the rest
// before asking). Then the whole allocation map is walked and at most 4 MiB of data is read,
// in pieces of up to 64 KiB at the data extents' offsets.

import CairnCore
import DiskFormats

private let maxReadBytes: UInt64 = 4 << 20
private let pieceBytes: UInt64 = 64 << 10
private let maxExtentsVisited = 4096

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let bytes = [UInt8](UnsafeRawBufferPointer(start: data, count: size))
    let source = MemoryBlockSource(bytes, name: "fuzz.vmdk")
    let image: VMDKImage
    do {
        image = try VMDKImage(file: source) { name in
            precondition(!name.contains("/") && name != ".." && name != ".", "unsafe extent name reached openExtent: \(name)")
            // Any size a descriptor may ask for is fine; keep it small so flat checks fail fast.
            return MemoryBlockSource([UInt8](repeating: 0, count: 64 << 10), name: name)
        }
    } catch {
        return 0
    }
    guard let extents = try? image.extents(in: 0..<image.size) else { return 0 }

    // The map must cover the disk exactly, in order.
    var pos: UInt64 = 0
    for e in extents {
        precondition(e.offset == pos && e.length > 0, "extents do not cover the disk in order")
        pos = e.end
    }
    precondition(pos == image.size, "extents end at \(pos), size \(image.size)")

    var buffer = [UInt8](repeating: 0, count: Int(pieceBytes))
    var budget = maxReadBytes
    buffer.withUnsafeMutableBytes { raw in
        for e in extents.prefix(maxExtentsVisited) where budget > 0 {
            let count = min(e.length, pieceBytes, budget)
            budget -= count
            let target = UnsafeMutableRawBufferPointer(rebasing: raw[0..<Int(count)])
            do {
                try image.read(into: target, at: e.offset)
                if e.kind != .data {
                    precondition(readsAsZeros(target), "a \(e.kind) extent read non-zero bytes")
                }
            } catch {
                continue
            }
        }
        // An unaligned read across the start, if the image has any size.
        if image.size > 0 {
            let count = min(image.size, 1000)
            try? image.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<Int(count)]), at: image.size - count)
        }
    }
    return 0
}
