import CairnCore

/// One extent of a file in blocks: `count` blocks from logical block `logical` are at
/// physical block `physical` (an unwritten extent reads as zeros).
struct ExtRun: Sendable, Equatable {
    var logical: UInt64
    var physical: UInt64
    var count: UInt64
    var unwritten: Bool
}

extension ExtFileSystem {
    /// Calls `body(logicalByte, physicalByte or nil for zeros, length)` for consecutive pieces
    /// covering `[offset, offset + count)` of the file, each as large as the mapping allows.
    func forEachPiece(_ i: ExtInode, from offset: UInt64, count: UInt64,
                      _ body: (UInt64, UInt64?, UInt64) throws -> Void) throws {
        let bs = UInt64(sb.blockSize)
        let end = offset + count
        var pos = offset
        if i.usesExtents {
            let runs = try extentRuns(i)
            // First run that ends after pos.
            var lo = 0, hi = runs.count
            let block = pos / bs
            while lo < hi {
                let mid = (lo + hi) / 2
                if runs[mid].logical + runs[mid].count <= block { lo = mid + 1 } else { hi = mid }
            }
            var k = lo
            while pos < end {
                let runStart = k < runs.count ? runs[k].logical * bs : UInt64.max
                if pos < runStart {
                    let len = min(end, runStart) - pos
                    try body(pos, nil, len)
                    pos += len
                    continue
                }
                let r = runs[k]
                let runEnd = (r.logical + r.count) * bs
                let len = min(end, runEnd) - pos
                try body(pos, r.unwritten ? nil : r.physical * bs + (pos - runStart), len)
                pos += len
                k += 1
            }
            return
        }
        // Block pointers: resolve block by block, merging physically contiguous blocks.
        var pendingStart = pos
        var pendingPhys: UInt64?? = .none
        var pendingLen: UInt64 = 0
        while pos < end {
            let lblock = pos / bs
            let within = pos % bs
            let len = min(end - pos, bs - within)
            let p = try mapIndirect(i, lblock)
            let phys: UInt64? = p.map { $0 * bs + within }
            if case .some(let prev) = pendingPhys, (prev == nil && phys == nil) || (prev != nil && phys == prev.map { $0 + pendingLen }) {
                pendingLen += len
            } else {
                if case .some(let prev) = pendingPhys { try body(pendingStart, prev, pendingLen) }
                pendingStart = pos
                pendingPhys = .some(phys)
                pendingLen = len
            }
            pos += len
        }
        if case .some(let prev) = pendingPhys { try body(pendingStart, prev, pendingLen) }
    }

    // MARK: File extents

    /// `FileSystem.fileExtents`: inline and encrypted files have no plain mapping (nil);
    /// extent-mapped files come from the cached extent runs (unwritten extents as holes),
    /// block-pointer files from one walk of their indirect blocks.
    package func fileExtents(_ node: UInt64) throws -> [FileExtent]? {
        let i = try inode(node)
        guard i.kind == .regular else {
            throw CairnError(.usage, "inode \(node) is not a regular file (\(i.kind.rawValue)); only regular files have extents",
                             path: volume.name, offset: i.offset)
        }
        if i.hasInlineData || i.isEncrypted { return nil }
        guard i.size > 0 else { return [] }
        guard i.usesExtents else { return try indirectExtents(i) }
        var out: [FileExtent] = []
        try forEachPiece(i, from: 0, count: i.size) { logical, physical, length in
            out.append(logicalOffset: logical, physicalOffset: physical, length: length)
        }
        return out
    }

    /// The extents of a block-pointer file, clipped to its size: the 12 direct pointers, then
    /// the single, double and triple indirect trees, a zero pointer at any level being a hole
    /// over everything below it (so sparse files cost only their allocated tree blocks). Each
    /// indirect block is read once; one reached twice (a cross-linked or looping tree) and
    /// more than `Ext.maxExtentsPerFile` extents are errors, as in extent trees.
    private func indirectExtents(_ i: ExtInode) throws -> [FileExtent] {
        let bs = UInt64(sb.blockSize)
        let ppb = UInt64(sb.blockSize / 4)
        let blocks = (i.size - 1) / bs + 1
        var out: [FileExtent] = []
        var visited: Set<UInt64> = []
        func emit(_ lblock: UInt64, _ pblock: UInt64?, _ count: UInt64) throws {
            let start = lblock * bs
            let left = i.size - start
            let length = count > left / bs ? left : count * bs
            out.append(logicalOffset: start, physicalOffset: pblock.map { $0 * bs }, length: length)
            guard out.count <= Ext.maxExtentsPerFile else {
                throw CairnError(.malformedImage, "inode \(i.number) maps more than \(Ext.maxExtentsPerFile) extents", path: volume.name,
                                 offset: i.offset + 0x28, hint: "the file system is damaged; run e2fsck on a restored copy")
            }
        }
        /// Logical blocks `base..<base + span` (clipped to the file) under pointer `ptr` at
        /// `level` (0: a data block).
        func visit(_ ptr: UInt64, level: Int, base: UInt64, span: UInt64) throws {
            let count = min(span, blocks - base)
            if ptr == 0 { return try emit(base, nil, count) }
            try checkPointer(i, ptr, base)
            if level == 0 { return try emit(base, ptr, 1) }
            guard visited.insert(ptr).inserted else {
                throw CairnError(.malformedImage, "inode \(i.number): indirect block \(ptr) is referenced twice (the tree loops or is cross-linked)",
                                 path: volume.name, offset: ptr * bs, hint: "the file system is damaged; run e2fsck on a restored copy")
            }
            let words = try indirectBlock(ptr)
            let childSpan = span / ppb
            var k = 0
            while k < words.count, base + UInt64(k) * childSpan < blocks {
                try visit(UInt64(words[k]), level: level - 1, base: base + UInt64(k) * childSpan, span: childSpan)
                k += 1
            }
        }
        var base: UInt64 = 0
        var span: UInt64 = 1
        for top in 0..<15 where base < blocks {
            let level = max(0, top - 11)
            if top >= 12 { span *= ppb }
            try visit(UInt64(i.blockWord(top)), level: level, base: base, span: span)
            base += span
        }
        // Past the triple indirect tree nothing is mapped (mapIndirect: a hole).
        if base < blocks { try emit(base, nil, blocks - base) }
        return out
    }

    // MARK: Extent trees

    /// The leaf extents of `i`'s extent tree in logical order (cached). Every tree block is
    /// visited once (a block referenced twice is an error), the depth is at most 5, extents
    /// must ascend without overlap and point inside the file system.
    func extentRuns(_ i: ExtInode) throws -> [ExtRun] {
        if let hit = cache.runs(i.number) { return hit }
        var out: [ExtRun] = []
        var visited: Set<UInt64> = []
        var nextLogical: UInt64 = 0
        try walkExtentNode(i, bytes: i.block, at: i.offset + 0x28, expectedDepth: nil, block: nil,
                           visited: &visited, nextLogical: &nextLogical, out: &out)
        cache.store(runs: out, for: i.number)
        return out
    }

    private func walkExtentNode(_ i: ExtInode, bytes: [UInt8], at offset: UInt64, expectedDepth: Int?, block: UInt64?,
                                visited: inout Set<UInt64>, nextLogical: inout UInt64, out: inout [ExtRun]) throws {
        let b = CheckedBytes(bytes)
        func bad(_ what: String, _ field: Int = 0) -> CairnError {
            CairnError(.malformedImage, "inode \(i.number) extent tree: \(what)", path: volume.name, offset: offset + UInt64(field),
                       hint: "the file system is damaged; run e2fsck on a restored copy")
        }
        guard b.u16(at: 0) == Ext.extentMagic else { throw bad("node has no extent magic 0xF30A") }
        let entries = Int(b.u16(at: 2) ?? 0)
        let maxEntries = Int(b.u16(at: 4) ?? 0)
        let depth = Int(b.u16(at: 6) ?? 0)
        guard maxEntries >= 1, 12 + 12 * maxEntries <= bytes.count, entries <= maxEntries else {
            throw bad("node claims \(entries) of \(maxEntries) entries, more than its \(bytes.count) bytes hold", 2)
        }
        if let expectedDepth {
            guard depth == expectedDepth else { throw bad("node depth \(depth) where \(expectedDepth) was expected", 6) }
        } else {
            guard depth <= Ext.maxExtentDepth else { throw bad("depth \(depth) is more than \(Ext.maxExtentDepth)", 6) }
        }
        if let block, sb.hasMetadataCsum, CRC32C.enforced {
            let tail = 12 + 12 * maxEntries
            guard tail + 4 <= bytes.count else { throw bad("no room for the checksum tail in block \(block)") }
            let stored = b.u32(at: tail) ?? 0
            let computed = CRC32C.update(i.checksumSeed, bytes[0..<tail])
            guard stored == computed else {
                throw bad("block \(block) checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))", tail)
            }
        }
        for e in 0..<entries {
            let o = 12 + 12 * e
            let logical = UInt64(b.u32(at: o) ?? 0)
            if depth == 0 {
                var len = UInt64(b.u16(at: o + 4) ?? 0)
                var unwritten = false
                if len > 32768 {
                    len -= 32768
                    unwritten = true
                }
                let start = UInt64(b.u16(at: o + 6) ?? 0) << 32 | UInt64(b.u32(at: o + 8) ?? 0)
                guard len > 0 else { throw bad("extent \(e) has length 0", o + 4) }
                guard logical >= nextLogical else { throw bad("extent \(e) (logical block \(logical)) overlaps or precedes the previous one", o) }
                guard start > 0, start < sb.blocksCount, len <= sb.blocksCount - start else {
                    throw bad("extent \(e) (blocks \(start)+\(len)) lies outside the \(sb.blocksCount)-block file system", o + 6)
                }
                guard out.count < Ext.maxExtentsPerFile else { throw bad("more than \(Ext.maxExtentsPerFile) extents") }
                nextLogical = logical + len
                if let last = out.last, last.unwritten == unwritten, last.logical + last.count == logical,
                   last.physical + last.count == start {
                    out[out.count - 1].count += len
                } else {
                    out.append(ExtRun(logical: logical, physical: start, count: len, unwritten: unwritten))
                }
            } else {
                let child = UInt64(b.u16(at: o + 8) ?? 0) << 32 | UInt64(b.u32(at: o + 4) ?? 0)
                guard child > 0, child < sb.blocksCount else {
                    throw bad("index \(e) points at block \(child), outside the \(sb.blocksCount)-block file system", o + 4)
                }
                guard visited.insert(child).inserted else { throw bad("block \(child) is referenced twice (the tree loops or is cross-linked)", o + 4) }
                let at = child * UInt64(sb.blockSize)
                let raw = try volume.readBytes(at: at, count: sb.blockSize)
                try walkExtentNode(i, bytes: raw, at: at, expectedDepth: depth - 1, block: child,
                                   visited: &visited, nextLogical: &nextLogical, out: &out)
            }
        }
    }

    // MARK: Block pointers (ext2/ext3)

    /// The physical block of logical block `lblock` through i_block's 12 direct pointers and
    /// the single, double and triple indirect blocks; nil for a hole.
    func mapIndirect(_ i: ExtInode, _ lblock: UInt64) throws -> UInt64? {
        let ppb = UInt64(sb.blockSize / 4)
        var l = lblock
        var path: [Int] = []
        var top: Int
        if l < 12 {
            top = Int(l)
        } else {
            l -= 12
            if l < ppb {
                top = 12
                path = [Int(l)]
            } else {
                l -= ppb
                if l < ppb * ppb {
                    top = 13
                    path = [Int(l / ppb), Int(l % ppb)]
                } else {
                    l -= ppb * ppb
                    guard l < ppb * ppb * ppb else { return nil }
                    top = 14
                    path = [Int(l / (ppb * ppb)), Int((l / ppb) % ppb), Int(l % ppb)]
                }
            }
        }
        var ptr = UInt64(i.blockWord(top))
        for index in path {
            if ptr == 0 { return nil }
            try checkPointer(i, ptr, lblock)
            let words = try indirectBlock(ptr)
            ptr = UInt64(words[index])
        }
        if ptr == 0 { return nil }
        try checkPointer(i, ptr, lblock)
        return ptr
    }

    private func checkPointer(_ i: ExtInode, _ ptr: UInt64, _ lblock: UInt64) throws {
        guard ptr >= sb.firstDataBlock, ptr < sb.blocksCount else {
            throw CairnError(.malformedImage, "inode \(i.number): block pointer \(ptr) for logical block \(lblock) lies outside the \(sb.blocksCount)-block file system",
                             path: volume.name, offset: i.offset + 0x28, hint: "the file system is damaged; run e2fsck on a restored copy")
        }
    }

    private func indirectBlock(_ block: UInt64) throws -> [UInt32] {
        if let hit = cache.indirect(block) { return hit }
        let raw = try volume.readBytes(at: block * UInt64(sb.blockSize), count: sb.blockSize)
        let words = raw.withUnsafeBytes { buf in
            (0..<sb.blockSize / 4).map { UInt32(littleEndian: buf.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self)) }
        }
        cache.store(indirect: words, at: block)
        return words
    }
}
