// libFuzzer target: the qcow2 reader on arbitrary bytes. It must never crash, trap, hang or
// allocate without bound: every malformed input is a thrown CairnError.
import CairnCore
import DiskFormats

private let zeroBacking = MemoryBlockSource([UInt8](repeating: 0, count: 1 << 16), name: "backing")

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzQCOW2(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let bytes = Array(UnsafeRawBufferPointer(start: data, count: size))
    let file = MemoryBlockSource(bytes, name: "fuzz.qcow2")
    for backing in [nil, zeroBacking] as [(any BlockSource)?] {
        guard let image = try? QCOW2Image(file: file, backing: backing) else { continue }
        exercise(image)
    }
    return 0
}
