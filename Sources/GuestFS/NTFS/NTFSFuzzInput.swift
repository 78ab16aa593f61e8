import CairnCore

/// The input encoding of the NTFS fuzz target (fuzz/targets/ntfs.swift), shared with the
/// regression test that replays fuzz/regressions/ntfs/: a small input describes a whole
/// volume as a list of 4 KiB pages.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | volume size in bytes (u32 LE), clamped to 4 KiB ... 64 MiB |
/// | 4 | 2 + up to 4096 | records: page number (u16 LE), then the page's bytes |
///
/// Every byte not given by a record reads as zero; a short last record fills only the start
/// of its page; pages past the volume end are ignored. Seeds (fuzz/seeds.d/ntfs.sh) are real
/// mkntfs/ntfs-3g images with their all-zero pages left out.
package enum NTFSFuzzInput {
    package static let pageSize = 4096
    package static let maxVolumeSize = 64 << 20

    package static func volume(from input: [UInt8]) -> MemoryBlockSource {
        let b = CheckedBytes(input)
        let declared = Int(b.u32(at: 0) ?? 0)
        let size = min(max(declared, pageSize), maxVolumeSize)
        var bytes = [UInt8](repeating: 0, count: size)
        var p = 4
        while p + 2 <= input.count {
            let page = Int(b.u16(at: p) ?? 0)
            p += 2
            let n = min(pageSize, input.count - p)
            let start = page * pageSize
            if start < size {
                let k = min(n, size - start)
                bytes.replaceSubrange(start..<start + k, with: input[p..<p + k])
            }
            p += n
        }
        return MemoryBlockSource(bytes, name: "fuzz-ntfs")
    }
}
