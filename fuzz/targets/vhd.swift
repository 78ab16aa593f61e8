// libFuzzer target: the VHD reader on arbitrary bytes. It must never crash, trap, hang or
// allocate without bound: every malformed input is a thrown CairnError.
//
// Builds either way: compiled into one module together with the CairnCore and DiskFormats
// sources (nothing to import), or linked against those modules as fuzz/build.sh does.
#if canImport(DiskFormats)
import CairnCore
import DiskFormats
#endif

private let zeroParent = MemoryBlockSource([UInt8](repeating: 0, count: 1 << 16), name: "parent")

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzVHD(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let bytes = Array(UnsafeRawBufferPointer(start: data, count: size))
    let file = MemoryBlockSource(bytes, name: "fuzz.vhd")
    for parent in [nil, zeroParent] as [(any BlockSource)?] {
        guard let image = try? VHDImage(file: file, parent: parent) else { continue }
        exercise(image)
    }
    return 0
}
