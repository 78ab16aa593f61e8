import CairnCore

extension XFSFileSystem {
    /// Free space is what each AG's free-space-by-block B+tree lists. Blocks on the AG free
    /// list (AGFL), the log, btree blocks, reflink copy-on-write staging extents and the
    /// preallocated tails of files are not in that tree, so they stay out (they count as used).
    /// A file system whose log is not clean (mounted, crashed) reports nothing free: its trees
    /// may predate allocations committed only to the log (see `logIsClean`).
    package func freeRanges() throws -> [Range<UInt64>] {
        guard try logIsClean() else { return [] }
        var out: [Range<UInt64>] = []
        let bs = UInt64(sb.blockSize)
        for agno in 0..<UInt64(sb.agCount) {
            let base = UInt64(agno) * UInt64(sb.agBlocks)
            for (start, count) in try freeExtents(agno) {
                let lower = (base + start) * bs, upper = (base + start + count) * bs
                if let last = out.last, last.upperBound == lower {
                    out[out.count - 1] = last.lowerBound..<upper
                } else {
                    out.append(lower..<upper)
                }
            }
        }
        return out
    }

    /// The free extents (AG block, length) of AG `agno`, ascending. Reads the AGF (sector 1 of
    /// the AG): magic "XAGF" (0), version 1 (4), sequence number (8), length in blocks (12),
    /// roots of the by-block / by-size / reverse-map trees (16, 20, 24), their levels (28, 32,
    /// 36), free-list first/last/count (40, 44, 48), free blocks (52), longest free extent (56);
    /// v5: UUID (64), CRC (216, little-endian). The free blocks count must equal the sum of the
    /// tree's records.
    func freeExtents(_ agno: UInt64) throws -> [(UInt64, UInt64)] {
        let at = sb.agStart(agno) + UInt64(sb.sectorSize)
        let raw = try volume.readBytes(at: at, count: sb.sectorSize)
        let b = CheckedBytes(raw, order: .big)
        let agLength = sb.agLength(agno)
        guard b.u32(at: 0) == XFSMagic.agf, b.u32(at: 4) == 1, b.u32(at: 8) == UInt32(truncatingIfNeeded: agno),
              b.u32(at: 12).map(UInt64.init) == agLength else {
            throw damaged("AGF of AG \(agno) has a bad magic, version, sequence number or length", at: at)
        }
        if sb.hasCRC {
            try verifyCRC(raw, field: 216, what: "AGF of AG \(agno)", at: at)
            guard b.slice(at: 64, count: 16).map(Array.init) == sb.metaUUID else {
                throw damaged("AGF of AG \(agno) has a UUID that does not match the superblock", at: at + 64)
            }
        }
        let root = UInt64(b.u32(at: 16) ?? 0), levels = Int(b.u32(at: 28) ?? 0)
        guard levels >= 1, levels <= XFSLimits.maxTreeDepth, root >= 1, root < agLength else {
            throw damaged("AGF of AG \(agno): free-space tree root \(root) at \(levels) levels is invalid", at: at + 16)
        }
        var out: [(UInt64, UInt64)] = []
        var visited: Set<UInt64> = []
        try walkFreeTree(agno: agno, block: root, level: levels - 1, agLength: agLength, visited: &visited, into: &out)
        let total = out.reduce(UInt64(0)) { $0 + $1.1 }
        let recorded = UInt64(b.u32(at: 52) ?? 0)
        guard total == recorded else {
            throw damaged("AGF of AG \(agno) counts \(recorded) free blocks but its free-space tree lists \(total)", at: at + 52)
        }
        return out
    }

    /// Reads free-space-by-block B+tree block `block` of AG `agno`. Short-format header: magic
    /// "AB3B"/"ABTB" (0), level (4, u16), record count (6, u16), left/right siblings (8, 12);
    /// v5 adds block number in 512-byte units (16), LSN (24), UUID (32), owner AG (48, u32),
    /// CRC (52, little-endian). Records (start block u32, length u32) start at 56 (v5) or 16;
    /// interior blocks hold as many 8-byte keys as fit, then u32 child pointers.
    private func walkFreeTree(agno: UInt64, block: UInt64, level: Int, agLength: UInt64, visited: inout Set<UInt64>,
                              into out: inout [(UInt64, UInt64)]) throws {
        guard block >= 1, block < agLength else {
            throw damaged("free-space tree of AG \(agno) points to block \(block) outside the AG (\(agLength) blocks)", at: sb.agStart(agno))
        }
        let linear = agno * UInt64(sb.agBlocks) + block
        let at = linear * UInt64(sb.blockSize)
        guard visited.insert(block).inserted else {
            throw damaged("free-space tree of AG \(agno) reaches block \(block) twice (a loop or cross-link)", at: at)
        }
        let raw = try volume.readBytes(at: at, count: sb.blockSize)
        let b = CheckedBytes(raw, order: .big)
        guard b.u32(at: 0) == (sb.hasCRC ? XFSMagic.bnobtV5 : XFSMagic.bnobtV4) else {
            throw damaged("free-space tree block \(block) of AG \(agno) has no valid magic", at: at)
        }
        if sb.hasCRC {
            try verifyCRC(raw, field: 52, what: "free-space tree block \(block) of AG \(agno)", at: at)
            try checkHeader(b, blkno: 16, uuid: 32, owner: (48, agno), ownerIs32Bit: true,
                            what: "free-space tree block \(block) of AG \(agno)", linear: linear)
        }
        let header = sb.hasCRC ? 56 : 16
        let blockLevel = Int(b.u16(at: 4) ?? 0), count = Int(b.u16(at: 6) ?? 0)
        guard blockLevel == level else {
            throw damaged("free-space tree block \(block) of AG \(agno) has level \(blockLevel), expected \(level)", at: at + 4)
        }
        if level == 0 {
            guard count <= (sb.blockSize - header) / 8 else {
                throw damaged("free-space tree block \(block) of AG \(agno) has \(count) records", at: at + 6)
            }
            for k in 0..<count {
                let start = UInt64(b.u32(at: header + 8 * k) ?? 0), length = UInt64(b.u32(at: header + 8 * k + 4) ?? 0)
                // Block 0 of every AG holds its headers and can never be free.
                guard start >= 1, start < agLength, length >= 1, length <= agLength - start else {
                    throw damaged("free extent \(start)+\(length) of AG \(agno) lies outside the AG", at: at + UInt64(header + 8 * k))
                }
                if let last = out.last, start < last.0 + last.1 {
                    throw damaged("free extents of AG \(agno) overlap or are out of order at block \(start)", at: at + UInt64(header + 8 * k))
                }
                out.append((start, length))
            }
            return
        }
        let maxRecords = (sb.blockSize - header) / 12
        guard count >= 1, count <= maxRecords else {
            throw damaged("free-space tree block \(block) of AG \(agno) has \(count) keys (at most \(maxRecords))", at: at + 6)
        }
        for k in 0..<count {
            let child = UInt64(b.u32(at: header + maxRecords * 8 + 4 * k) ?? 0)
            try walkFreeTree(agno: agno, block: child, level: level - 1, agLength: agLength, visited: &visited, into: &out)
        }
    }
}
