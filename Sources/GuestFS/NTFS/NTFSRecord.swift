import CairnCore

/// Applies and checks the update-sequence (fixup) array of a multi-sector structure (MFT
/// record "FILE" or index block "INDX"), in place. Header fields used: update-sequence array
/// offset (u16 at 4) and count (u16 at 6, the sequence number plus one entry per 512-byte
/// block). The last two bytes of every 512-byte block must equal the sequence number; they
/// are replaced by the saved bytes from the array.
///
/// Returns a description of what is wrong, or nil when the fixups applied cleanly. In fuzz
/// builds (`CRC32C.enforced` false) a mismatching block is repaired without complaint, so the
/// fuzzer gets past this check.
func ntfsApplyFixups(_ bytes: inout [UInt8]) -> String? {
    let b = CheckedBytes(bytes)
    guard let offset = b.u16(at: 4).map(Int.init), let count = b.u16(at: 6).map(Int.init) else { return "header truncated" }
    let blocks = bytes.count / NTFSConstants.fixupStride
    guard count == blocks + 1 else {
        return "update sequence count \(count) does not match \(blocks) blocks of 512 bytes"
    }
    guard offset >= 8, offset & 1 == 0, offset + 2 * count <= bytes.count, offset + 2 * count <= NTFSConstants.fixupStride else {
        return "update sequence array at \(offset) (\(count) entries) does not fit in the first block"
    }
    let usn0 = bytes[offset], usn1 = bytes[offset + 1]
    for i in 1..<count {
        let end = i * NTFSConstants.fixupStride
        if bytes[end - 2] != usn0 || bytes[end - 1] != usn1, CRC32C.enforced {
            return "block \(i - 1) does not end with the update sequence number (torn write or damage)"
        }
        bytes[end - 2] = bytes[offset + 2 * i]
        bytes[end - 1] = bytes[offset + 2 * i + 1]
    }
    return nil
}

/// One run of a runlist: `length` clusters from virtual cluster `vcn` live at logical
/// cluster `lcn`, or are sparse (nil).
struct NTFSRun: Sendable, Equatable {
    var vcn: UInt64
    var lcn: UInt64?
    var length: UInt64
}

/// A non-resident attribute's value: its runlist (all extents joined) and sizes.
///
/// Non-resident attribute header, from the attribute's start:
///
/// | offset | size | field |
/// |---|---|---|
/// | 16 | 8 | lowest VCN of this extent |
/// | 24 | 8 | highest VCN of this extent |
/// | 32 | 2 | offset of the mapping pairs (runlist) |
/// | 34 | 1 | compression unit (log2 of clusters; 0 = not compressed) |
/// | 40 | 8 | allocated size (first extent only) |
/// | 48 | 8 | data size |
/// | 56 | 8 | initialized size |
struct NTFSStream: Sendable {
    var runs: [NTFSRun]
    var dataSize: UInt64
    var initializedSize: UInt64
    var allocatedSize: UInt64
    /// log2 of the compression unit in clusters (0: not compressed).
    var compressionUnit: UInt8
    var flags: UInt16

    var isCompressed: Bool { flags & NTFSConstants.attributeCompressed != 0 && compressionUnit != 0 }
    var isEncrypted: Bool { flags & NTFSConstants.attributeEncrypted != 0 }
    /// Clusters the runlist maps.
    var mappedClusters: UInt64 { runs.last.map { $0.vcn + $0.length } ?? 0 }

    /// Index of the run containing `vcn`, or nil.
    func runIndex(containing vcn: UInt64) -> Int? {
        var lo = 0, hi = runs.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let r = runs[mid]
            if vcn < r.vcn { hi = mid } else if vcn - r.vcn >= r.length { lo = mid + 1 } else { return mid }
        }
        return nil
    }
}

/// An attribute as found in an MFT record (resident value copied out, non-resident header and
/// this extent's runs decoded).
///
/// Common attribute header: type (u32 at 0), length (u32 at 4), non-resident flag (u8 at 8),
/// name length in UTF-16 units (u8 at 9), name offset (u16 at 10), flags (u16 at 12).
/// Resident: value length (u32 at 16), value offset (u16 at 20).
struct NTFSAttribute: Sendable {
    var type: UInt32
    var name: String
    var flags: UInt16
    /// The record the attribute was found in.
    var record: UInt64
    /// Byte offset of the attribute in the volume (for messages).
    var volumeOffset: UInt64
    var resident: [UInt8]?
    // Non-resident extent fields.
    var lowestVCN: UInt64 = 0
    var highestVCN: UInt64 = 0
    var compressionUnit: UInt8 = 0
    var allocatedSize: UInt64 = 0
    var dataSize: UInt64 = 0
    var initializedSize: UInt64 = 0
    var runs: [NTFSRun] = []
}

/// A decoded MFT record ("FILE"). Header fields used (little-endian):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | magic "FILE" |
/// | 4 | 2 | update sequence array offset |
/// | 6 | 2 | update sequence array count |
/// | 16 | 2 | sequence number |
/// | 18 | 2 | hard link count |
/// | 20 | 2 | offset of the first attribute |
/// | 22 | 2 | flags (1 in use, 2 directory) |
/// | 24 | 4 | bytes in use |
/// | 28 | 4 | bytes allocated (the record size) |
/// | 32 | 8 | base record reference (0 for a base record) |
struct NTFSRecord: Sendable {
    var number: UInt64
    var flags: UInt16
    var sequence: UInt16
    var baseRecord: UInt64
    var attributes: [NTFSAttribute]

    var inUse: Bool { flags & NTFSConstants.recordInUse != 0 }
    var isDirectory: Bool { flags & NTFSConstants.recordIsDirectory != 0 }

    /// Parses record `number` from `raw` (exactly one record, fixups not yet applied) read at
    /// byte `offset` of `volume`; `totalClusters` bounds runlists.
    init(number: UInt64, raw: [UInt8], offset: UInt64, volume: String, totalClusters: UInt64) throws {
        func bad(_ what: String, at o: Int = 0) -> CairnError {
            CairnError(.malformedImage, "MFT record \(number): \(what)", path: volume, offset: offset + UInt64(o),
                       hint: "the file system is damaged; run chkdsk (or ntfsfix -n) on a restored copy")
        }
        guard raw.count >= 512, Array(raw.prefix(4)) == NTFSConstants.fileMagic else {
            throw bad(raw.prefix(4).allSatisfy { $0 == 0 } ? "is empty (no \"FILE\" magic)" : "has no \"FILE\" magic")
        }
        var bytes = raw
        if let problem = ntfsApplyFixups(&bytes) { throw bad("update sequence: \(problem)", at: 4) }
        let b = CheckedBytes(bytes)
        guard let seq = b.u16(at: 16), let first = b.u16(at: 20), let flags = b.u16(at: 22), let used = b.u32(at: 24),
              let base = b.u64(at: 32) else { throw bad("header truncated") }
        self.number = number
        self.flags = flags
        self.sequence = seq
        self.baseRecord = base & 0x0000_FFFF_FFFF_FFFF
        let usedBytes = min(Int(exactly: used) ?? bytes.count, bytes.count)
        var attrs: [NTFSAttribute] = []
        var pos = Int(first)
        guard pos >= 24, pos < bytes.count else { throw bad("first attribute offset \(first) is outside the record", at: 20) }
        while true {
            guard let type = b.u32(at: pos) else { throw bad("attribute list runs off the end of the record", at: pos) }
            if type == NTFSConstants.endMarker { break }
            guard pos < usedBytes else { throw bad("attributes run past the bytes in use (\(used)) without an end marker", at: pos) }
            guard let len32 = b.u32(at: pos + 4), let len = Int(exactly: len32), len >= 16,
                  len <= bytes.count - pos else {
                throw bad("attribute at \(pos) has a bad length \(b.u32(at: pos + 4) ?? 0)", at: pos + 4)
            }
            attrs.append(try Self.parseAttribute(b, at: pos, length: len, type: type, record: number, recordOffset: offset,
                                                 totalClusters: totalClusters, bad: bad))
            pos += len
        }
        attributes = attrs
    }

    static func parseAttribute(_ b: CheckedBytes, at pos: Int, length: Int, type: UInt32, record: UInt64, recordOffset: UInt64,
                               totalClusters: UInt64, bad: (String, Int) -> CairnError) throws -> NTFSAttribute {
        guard let nonResident = b.u8(at: pos + 8), let nameLength = b.u8(at: pos + 9), let nameOffset = b.u16(at: pos + 10),
              let flags = b.u16(at: pos + 12) else { throw bad("attribute header truncated", pos) }
        var name = ""
        if nameLength > 0 {
            let no = Int(nameOffset)
            guard no + 2 * Int(nameLength) <= length, let units = b.slice(at: pos + no, count: 2 * Int(nameLength)) else {
                throw bad("attribute name (\(nameLength) characters at \(nameOffset)) lies outside the attribute", pos + 10)
            }
            name = ntfsUTF16String(units)
        }
        var attr = NTFSAttribute(type: type, name: name, flags: flags, record: record, volumeOffset: recordOffset + UInt64(pos), resident: nil)
        if nonResident == 0 {
            guard let vlen = b.u32(at: pos + 16), let voff = b.u16(at: pos + 20), let vl = Int(exactly: vlen),
                  Int(voff) <= length, vl <= length - Int(voff), let value = b.slice(at: pos + Int(voff), count: vl) else {
                throw bad("resident value of attribute 0x\(String(type, radix: 16)) lies outside the attribute", pos + 16)
            }
            attr.resident = Array(value)
            return attr
        }
        guard length >= 64, let low = b.u64(at: pos + 16), let high = b.u64(at: pos + 24), let mpo = b.u16(at: pos + 32),
              let cu = b.u8(at: pos + 34), let alloc = b.u64(at: pos + 40), let size = b.u64(at: pos + 48),
              let initialized = b.u64(at: pos + 56) else {
            throw bad("non-resident attribute 0x\(String(type, radix: 16)) header truncated", pos)
        }
        guard Int(mpo) >= 64, Int(mpo) <= length else {
            throw bad("mapping pairs offset \(mpo) lies outside the attribute", pos + 32)
        }
        guard high >= low || (high &+ 1 == low) else {
            throw bad("extent's highest VCN \(high) is below its lowest VCN \(low)", pos + 16)
        }
        attr.lowestVCN = low
        attr.highestVCN = high
        attr.compressionUnit = cu
        attr.allocatedSize = alloc
        attr.dataSize = size
        attr.initializedSize = initialized
        guard let pairs = b.slice(at: pos + Int(mpo), count: length - Int(mpo)) else { throw bad("mapping pairs truncated", pos + Int(mpo)) }
        attr.runs = try ntfsDecodeRunlist(pairs, startVCN: low, totalClusters: totalClusters) { what, o in bad(what, pos + Int(mpo) + o) }
        return attr
    }
}

/// Decodes mapping pairs: each run starts with a header byte whose low nibble is the size of
/// the run length field and whose high nibble is the size of the LCN delta field (0 = sparse
/// run); the length is unsigned, the delta signed, both little-endian; a 0 byte ends the list.
/// The first delta is relative to LCN 0, each later one to the previous run's LCN.
func ntfsDecodeRunlist(_ pairs: ArraySlice<UInt8>, startVCN: UInt64, totalClusters: UInt64,
                   bad: (String, Int) -> CairnError) throws -> [NTFSRun] {
    var runs: [NTFSRun] = []
    var p = pairs.startIndex
    var vcn = startVCN
    var lcn: Int64 = 0
    while p < pairs.endIndex {
        let header = pairs[p]
        if header == 0 { return runs }
        let lengthSize = Int(header & 0x0F), offsetSize = Int(header >> 4)
        let rel = p - pairs.startIndex
        guard lengthSize >= 1, lengthSize <= 8, offsetSize <= 8 else {
            throw bad("runlist header byte 0x\(String(header, radix: 16)) has bad field sizes", rel)
        }
        guard 1 + lengthSize + offsetSize <= pairs.endIndex - p else { throw bad("runlist entry runs past the attribute", rel) }
        var length: UInt64 = 0
        for i in 0..<lengthSize { length |= UInt64(pairs[p + 1 + i]) << (8 * i) }
        // Sparse runs may be longer than the volume (a hole of many GiB); allocated ones are
        // checked against it below.
        guard length > 0 else { throw bad("run of 0 clusters", rel) }
        var run = NTFSRun(vcn: vcn, lcn: nil, length: length)
        if offsetSize > 0 {
            var delta: UInt64 = 0
            for i in 0..<offsetSize { delta |= UInt64(pairs[p + 1 + lengthSize + i]) << (8 * i) }
            if offsetSize < 8, pairs[p + lengthSize + offsetSize] & 0x80 != 0 { delta |= ~0 << (8 * offsetSize) }
            let (sum, overflow) = lcn.addingReportingOverflow(Int64(bitPattern: delta))
            guard !overflow, sum >= 0, UInt64(sum) < totalClusters, length <= totalClusters - UInt64(sum) else {
                throw bad("run at VCN \(vcn) (\(length) clusters at LCN \(overflow ? "overflow" : String(sum))) lies outside the volume (\(totalClusters) clusters)", rel)
            }
            lcn = sum
            run.lcn = UInt64(sum)
        }
        guard runs.count < NTFSConstants.maxRuns else { throw bad("more than \(NTFSConstants.maxRuns) runs", rel) }
        let (next, over) = vcn.addingReportingOverflow(length)
        guard !over else { throw bad("runlist VCNs overflow", rel) }
        runs.append(run)
        vcn = next
        p += 1 + lengthSize + offsetSize
    }
    return runs
}

/// UTF-16LE bytes to a String (unpaired surrogates become U+FFFD).
func ntfsUTF16String(_ bytes: ArraySlice<UInt8>) -> String {
    var units: [UInt16] = []
    units.reserveCapacity(bytes.count / 2)
    var i = bytes.startIndex
    while i + 1 < bytes.endIndex {
        units.append(UInt16(bytes[i]) | UInt16(bytes[i + 1]) << 8)
        i += 2
    }
    return String(decoding: units, as: UTF16.self)
}

/// An NTFS time (100-ns intervals since 1601-01-01 UTC) as Unix seconds and nanoseconds.
func ntfsTime(_ raw: UInt64) -> FileTime {
    let t = Int64(bitPattern: raw)
    let (u, overflow) = t.subtractingReportingOverflow(NTFSConstants.epochDelta)
    guard !overflow else { return FileTime(seconds: 0) }
    var s = u / 10_000_000
    var r = u % 10_000_000
    if r < 0 { s -= 1; r += 10_000_000 }
    return FileTime(seconds: s, nanoseconds: UInt32(r * 100))
}
