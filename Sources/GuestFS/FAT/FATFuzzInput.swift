import CairnCore

extension FATFileSystem {
    /// The fuzz input encoding of fuzz/targets/fat.swift (shared with the tests that replay
    /// fuzz inputs): the input is the start of the volume, which is as long as the boot sector
    /// says (total sectors x bytes per sector, read from the BPB fields at 11, 19 and 32), at
    /// most 64 MiB and at least the input; bytes past the input read as zeros.
    package static func fuzzVolume(_ input: [UInt8]) -> MemoryBlockSource {
        let b = CheckedBytes(input)
        let bps = UInt64(b.u16(at: 11) ?? 0)
        let sectors = UInt64(b.u16(at: 19).flatMap { $0 == 0 ? nil : UInt32($0) } ?? b.u32(at: 32) ?? 0)
        return MemoryBlockSource(input, name: "fuzz.fat", zeroPaddedTo: min(64 << 20, bps * sectors))
    }
}
