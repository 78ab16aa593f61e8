import CairnCore

/// Reads the value of non-resident attributes through their runlists: plain, sparse (holes
/// read as zeros without I/O) and LZNT1-compressed. Bytes at or beyond the initialized size
/// read as zeros, as Windows does.
struct NTFSStreamReader: Sendable {
    var volume: any BlockSource
    var clusterSize: Int

    /// Largest compression unit accepted (NTFS writes 16 clusters; the format allows 2^cu).
    static let maxCompressionUnitBytes = 4 << 20

    func damaged(_ what: String, offset: UInt64? = nil) -> CairnError {
        CairnError(.malformedImage, what, path: volume.name, offset: offset,
                   hint: "the file system is damaged; run chkdsk (or ntfsfix -n) on a restored copy")
    }

    /// Reads `buffer.count` bytes at volume byte `offset`, with a malformed-image error (not
    /// an I/O error) when they lie past the end of a truncated volume.
    func readVolume(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: @autoclosure () -> String) throws {
        guard offset <= volume.size, UInt64(buffer.count) <= volume.size - offset else {
            throw damaged("\(what()) lies past the end of the volume (\(volume.size) bytes; truncated image?)", offset: offset)
        }
        try volume.read(into: buffer, at: offset)
    }

    /// Reads stream bytes at `offset` into `buffer`; returns the count read (short only at the
    /// end of the data). `what` names the attribute for messages.
    func read(_ s: NTFSStream, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, what: String) throws -> Int {
        guard offset < s.dataSize, buffer.count > 0 else { return 0 }
        let n = Int(min(UInt64(buffer.count), s.dataSize - offset))
        let out = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
        if s.isEncrypted {
            throw CairnError(.unsupported, "\(what) is encrypted (EFS); Cairn cannot read encrypted NTFS files", path: volume.name)
        }
        if s.isCompressed {
            try readCompressed(s, at: offset, into: out, what: what)
        } else {
            try readPlain(s, at: offset, into: out, what: what)
        }
        // Past the initialized size everything reads as zeros.
        if s.initializedSize < offset + UInt64(n) {
            let from = s.initializedSize > offset ? Int(s.initializedSize - offset) : 0
            if from < n { UnsafeMutableRawBufferPointer(rebasing: out[from..<n]).initializeMemory(as: UInt8.self, repeating: 0) }
        }
        return n
    }

    /// Reads a whole (small) stream into an array; `limit` bounds the allocation.
    func readAll(_ s: NTFSStream, limit: Int, what: String) throws -> [UInt8] {
        guard s.dataSize <= UInt64(limit) else {
            throw damaged("\(what) claims \(s.dataSize) bytes, more than the \(limit) accepted")
        }
        var bytes = [UInt8](repeating: 0, count: Int(s.dataSize))
        let got = try bytes.withUnsafeMutableBytes { try read(s, at: 0, into: $0, what: what) }
        if got < bytes.count { bytes.removeLast(bytes.count - got) }
        return bytes
    }

    /// Uncompressed (possibly sparse) data: copies run by run straight into `out`.
    /// `raw` reads clusters regardless of the initialized size (compressed units, whose
    /// stored bytes are not file offsets).
    private func readPlain(_ s: NTFSStream, at offset: UInt64, into out: UnsafeMutableRawBufferPointer, what: String,
                           raw: Bool = false) throws {
        let cs = UInt64(clusterSize)
        var done = 0
        // Nothing past the initialized size needs mapping: read() zeroes it.
        let limit = raw ? UInt64.max : s.initializedSize
        let wanted = limit > offset ? Int(min(UInt64(out.count), limit - offset)) : 0
        while done < wanted {
            let pos = offset + UInt64(done)
            let vcn = pos / cs, within = pos % cs
            guard let ri = s.runIndex(containing: vcn) else {
                throw damaged("\(what): no run maps byte \(pos) (VCN \(vcn)) although the attribute is initialized up to \(s.initializedSize)")
            }
            let run = s.runs[ri]
            let leftInRun = (mul(run.vcn + run.length - vcn, cs) ?? UInt64.max) - within
            let k = Int(min(UInt64(wanted - done), leftInRun))
            let piece = UnsafeMutableRawBufferPointer(rebasing: out[done..<done + k])
            if let lcn = run.lcn {
                guard let phys = mul(lcn + (vcn - run.vcn), cs).flatMap({ add($0, within) }) else {
                    throw damaged("\(what): run at VCN \(run.vcn) maps past the addressable range")
                }
                try readVolume(into: piece, at: phys, what: "\(what) data at VCN \(vcn)")
            } else {
                piece.initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += k
        }
    }

    /// Compressed data: each compression unit of 2^cu clusters is either all sparse (zeros),
    /// fully allocated (stored raw) or partly allocated (the allocated clusters hold LZNT1
    /// data that expands to the unit).
    private func readCompressed(_ s: NTFSStream, at offset: UInt64, into out: UnsafeMutableRawBufferPointer, what: String) throws {
        guard s.compressionUnit <= 16, clusterSize << Int(s.compressionUnit) <= Self.maxCompressionUnitBytes else {
            throw CairnError(.unsupported, "\(what): compression unit of 2^\(s.compressionUnit) clusters is not supported", path: volume.name)
        }
        let unitClusters = UInt64(1) << UInt64(s.compressionUnit)
        let unitBytes = UInt64(clusterSize) << UInt64(s.compressionUnit)
        var done = 0
        var unitBuffer: [UInt8] = []
        while done < out.count {
            let pos = offset + UInt64(done)
            let unit = pos / unitBytes
            let within = Int(pos % unitBytes)
            let k = min(out.count - done, Int(unitBytes) - within)
            let piece = UnsafeMutableRawBufferPointer(rebasing: out[done..<done + k])
            if pos >= s.initializedSize {
                piece.initializeMemory(as: UInt8.self, repeating: 0)
                done += k
                continue
            }
            let firstVCN = unit * unitClusters
            // Count allocated clusters at the start of the unit and whether any are sparse.
            var allocated: UInt64 = 0
            var sparse = false
            var vcn = firstVCN
            while vcn < firstVCN + unitClusters {
                guard let ri = s.runIndex(containing: vcn) else { sparse = true; break }
                let run = s.runs[ri]
                let span = min(run.vcn + run.length, firstVCN + unitClusters) - vcn
                if run.lcn == nil {
                    sparse = true
                    break
                }
                allocated += span
                vcn += span
            }
            if allocated == 0 {
                piece.initializeMemory(as: UInt8.self, repeating: 0)
            } else if !sparse {
                try readPlain(s, at: pos, into: piece, what: what)
            } else {
                var compressed = [UInt8](repeating: 0, count: Int(allocated) * clusterSize)
                try compressed.withUnsafeMutableBytes {
                    try readPlain(s, at: unit * unitBytes, into: $0, what: what, raw: true)
                }
                if unitBuffer.count != Int(unitBytes) { unitBuffer = [UInt8](repeating: 0, count: Int(unitBytes)) }
                do {
                    try LZNT1.decompress(compressed, into: &unitBuffer)
                } catch let e as CairnError {
                    throw damaged("\(what), compression unit \(unit): \(e.message)")
                }
                unitBuffer.withUnsafeBytes { src in
                    piece.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[within..<within + k]))
                }
            }
            done += k
        }
    }
}

/// LZNT1, the compression of NTFS: a sequence of chunks, each with a 16-bit header (bits
/// 0-11: stored size - 3, bit 15: compressed) expanding to at most 4096 bytes. A compressed
/// chunk is groups of a flag byte and eight tokens (bit clear: a literal byte; bit set: a
/// 16-bit back-reference whose split between offset and length depends on how far into the
/// chunk the output is). A header of 0 ends the stream; a chunk that expands short of 4096
/// bytes is followed by zeros up to the chunk boundary.
enum LZNT1 {
    static let chunkSize = 4096

    /// Decompresses `src` into `out` (overwritten entirely; what the stream does not produce
    /// is zero).
    static func decompress(_ src: [UInt8], into out: inout [UInt8]) throws {
        let outCount = out.count
        try out.withUnsafeMutableBufferPointer { o in
            o.initialize(repeating: 0)
            try src.withUnsafeBufferPointer { s in
                var sp = 0
                var chunkStart = 0
                while sp + 2 <= s.count, chunkStart < outCount {
                    let header = Int(s[sp]) | Int(s[sp + 1]) << 8
                    if header == 0 { return }
                    sp += 2
                    let size = (header & 0x0FFF) + 1
                    guard size <= s.count - sp else {
                        throw CairnError(.malformedImage, "LZNT1 chunk of \(size) bytes runs past the compressed data")
                    }
                    let chunkEnd = min(chunkStart + chunkSize, outCount)
                    if header & 0x8000 == 0 {
                        let n = min(size, chunkEnd - chunkStart)
                        for i in 0..<n { o[chunkStart + i] = s[sp + i] }
                    } else {
                        var p = sp
                        let end = sp + size
                        var op = chunkStart
                        while p < end, op < chunkEnd {
                            let flags = s[p]
                            p += 1
                            for bit in 0..<8 {
                                guard p < end, op < chunkEnd else { break }
                                if flags & (1 << bit) == 0 {
                                    o[op] = s[p]
                                    op += 1
                                    p += 1
                                    continue
                                }
                                guard p + 1 < end else {
                                    throw CairnError(.malformedImage, "LZNT1 back-reference cut off at the end of a chunk")
                                }
                                let token = Int(s[p]) | Int(s[p + 1]) << 8
                                p += 2
                                let done = op - chunkStart
                                guard done > 0 else {
                                    throw CairnError(.malformedImage, "LZNT1 back-reference at the start of a chunk")
                                }
                                var lengthBits = 12
                                var i = done - 1
                                while i >= 0x10 { lengthBits -= 1; i >>= 1 }
                                let back = (token >> lengthBits) + 1
                                let length = (token & ((1 << lengthBits) - 1)) + 3
                                guard back <= done else {
                                    throw CairnError(.malformedImage, "LZNT1 back-reference \(back) bytes back reaches before its chunk")
                                }
                                guard length <= chunkEnd - op else {
                                    throw CairnError(.malformedImage, "LZNT1 back-reference of \(length) bytes runs past its chunk")
                                }
                                for _ in 0..<length {
                                    o[op] = o[op - back]
                                    op += 1
                                }
                            }
                        }
                    }
                    sp += size
                    chunkStart += chunkSize
                }
            }
        }
    }
}
