import CairnCore

extension XFSFileSystem {
    /// Directory entry file types (`XFS_DIR3_FT_*`) as kinds; 0 and unknown values say nothing.
    static func kind(fileType: UInt8) -> FileKind? { FileKind(direntType: fileType) }

    /// Logical offset of the leaf space in a directory (32 GiB): entries live below it.
    static let leafSpaceOffset: UInt64 = 32 << 30

    package func directory(_ node: UInt64) throws -> [DirectoryEntry] {
        if let hit = cache.state.withLock({ $0.directories[node] }) { return hit }
        let map = try fileMap(node)
        let i = map.inode
        guard i.kind == .directory else {
            throw CairnError(.malformedImage, "XFS inode \(node) is a \(i.kind.rawValue), not a directory", path: volume.name, offset: i.offset)
        }
        let entries = i.format == .local ? try shortFormDirectory(i) : try blockDirectory(map)
        cache.state.withLock { state in
            if state.directories.count >= XFSLimits.cachedDirectories
                || state.cachedEntries + entries.count > XFSLimits.cachedDirectoryEntries {
                state.directories.removeAll(keepingCapacity: true)
                state.cachedEntries = 0
            }
            if entries.count <= XFSLimits.cachedDirectoryEntries {
                state.directories[node] = entries
                state.cachedEntries += entries.count
            }
        }
        return entries
    }

    /// A short-form directory in the inode's data fork: count (0), count of 8-byte inode
    /// numbers (1), parent inode (2, 4 or 8 bytes), then entries: name length (1), saved offset
    /// (2), name, file type (1, with the ftype feature), inode number (4 or 8 bytes).
    private func shortFormDirectory(_ i: XFSInode) throws -> [DirectoryEntry] {
        let at = i.offset + UInt64(sb.hasCRC ? 176 : 100)
        let data = Array(i.dataFork.prefix(Int(i.size)))
        let b = CheckedBytes(data, order: .big)
        guard let count = b.u8(at: 0), let wide = b.u8(at: 1) else {
            throw damaged("short-form directory inode \(i.number) is shorter than its header", at: at)
        }
        let inoSize = wide > 0 ? 8 : 4
        var pos = 2 + inoSize
        var out: [DirectoryEntry] = []
        for _ in 0..<Int(count) {
            guard let nameLength = b.u8(at: pos), nameLength > 0, let name = b.slice(at: pos + 3, count: Int(nameLength)) else {
                throw damaged("short-form directory inode \(i.number): entry at \(pos) runs past the directory's \(data.count) bytes", at: at + UInt64(pos))
            }
            var p = pos + 3 + Int(nameLength)
            var kind: FileKind?
            if sb.hasFileType {
                guard let t = b.u8(at: p) else { throw damaged("short-form directory inode \(i.number) is truncated", at: at + UInt64(p)) }
                kind = Self.kind(fileType: t)
                p += 1
            }
            guard let ino = inoSize == 8 ? b.u64(at: p) : b.u32(at: p).map(UInt64.init) else {
                throw damaged("short-form directory inode \(i.number) is truncated", at: at + UInt64(p))
            }
            out.append(DirectoryEntry(name: String(decoding: name, as: UTF8.self), node: ino, kind: kind))
            pos = p + inoSize
        }
        return out
    }

    /// Block, leaf and node directories: every directory data block below the 32 GiB leaf
    /// space, in file order (directory blocks are `blockSize << dirblklog` bytes and may span
    /// several extents).
    private func blockDirectory(_ map: XFSFileMap) throws -> [DirectoryEntry] {
        let i = map.inode
        let bs = UInt64(sb.blockSize)
        let perDirBlock = UInt64(1) << UInt64(sb.dirBlockLog)
        let leafBlock = Self.leafSpaceOffset / bs
        // Directory block numbers with at least one mapped block, ascending.
        var dirBlocks: [UInt64] = []
        let maxDirBlocks = volume.size / UInt64(sb.dirBlockSize) + 1
        for e in map.extents where e.logical < leafBlock {
            var db = e.logical / perDirBlock
            let last = (min(e.logicalEnd, leafBlock) - 1) / perDirBlock
            while db <= last {
                if dirBlocks.last != db {
                    dirBlocks.append(db)
                    guard UInt64(dirBlocks.count) <= maxDirBlocks else {
                        throw damaged("directory inode \(i.number) maps more data blocks than its volume holds", at: i.offset)
                    }
                }
                db += 1
            }
        }
        var out: [DirectoryEntry] = []
        for db in dirBlocks {
            let (raw, linear) = try readDirectoryBlock(map, first: db * perDirBlock, count: perDirBlock)
            try parseDataBlock(raw, linear: linear, directory: i.number, into: &out)
        }
        return out
    }

    /// The bytes of the directory block made of `count` file blocks from `first`, and the
    /// volume block of its first block. Every block must be mapped and written.
    private func readDirectoryBlock(_ map: XFSFileMap, first: UInt64, count: UInt64) throws -> ([UInt8], UInt64) {
        let bs = UInt64(sb.blockSize)
        var raw = [UInt8](repeating: 0, count: Int(count * bs))
        var firstLinear: UInt64 = 0
        var block = first
        var index = map.firstExtent(atOrAfter: first)
        while block < first + count {
            guard index < map.extents.count, map.extents[index].logical <= block, !map.extents[index].unwritten else {
                throw damaged("directory inode \(map.inode.number): block \(block) of a directory block is not mapped", at: map.inode.offset)
            }
            let e = map.extents[index]
            let n = min(e.logicalEnd, first + count) - block
            let linear = e.physical + (block - e.logical)
            if block == first { firstLinear = linear }
            let start = Int((block - first) * bs)
            try raw.withUnsafeMutableBytes { buf in
                try volume.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[start..<start + Int(n * bs)]), at: linear * bs)
            }
            block += n
            index += 1
        }
        return (raw, firstLinear)
    }

    /// Appends the live entries of one directory data block. Header: v5 `xfs_dir3_data_hdr`
    /// (magic "XDB3"/"XDD3" (0), CRC (4, little-endian), block number (8), LSN (16), UUID (24),
    /// owner (40), best-free table (48), pad; 64 bytes); v4 magic "XD2B"/"XD2D" and the
    /// best-free table (16 bytes). A single-block directory ("XDB3"/"XD2B") ends with its hash
    /// leaf: a tail of entry count (u32) and stale count (u32) in the last 8 bytes, preceded by
    /// count 8-byte leaf entries. Entries: inode number (u64), name length (u8), name, file
    /// type (u8, with ftype), padding, tag (u16), 8-byte aligned; unused space: 0xFFFF, length
    /// (u16), ..., tag.
    private func parseDataBlock(_ raw: [UInt8], linear: UInt64, directory ino: UInt64, into out: inout [DirectoryEntry]) throws {
        let at = linear * UInt64(sb.blockSize)
        let b = CheckedBytes(raw, order: .big)
        let magic = b.u32(at: 0) ?? 0
        let isBlockForm: Bool
        if sb.hasCRC {
            guard magic == XFSMagic.dirBlockV5 || magic == XFSMagic.dirDataV5 else {
                throw damaged("directory block of inode \(ino) has no \"XDB3\"/\"XDD3\" magic", at: at)
            }
            isBlockForm = magic == XFSMagic.dirBlockV5
            try verifyCRC(raw, field: 4, what: "directory block of inode \(ino)", at: at)
            try checkHeader(b, blkno: 8, uuid: 24, owner: (40, ino), what: "directory block of inode \(ino)", linear: linear)
        } else {
            guard magic == XFSMagic.dirBlockV4 || magic == XFSMagic.dirDataV4 else {
                throw damaged("directory block of inode \(ino) has no \"XD2B\"/\"XD2D\" magic", at: at)
            }
            isBlockForm = magic == XFSMagic.dirBlockV4
        }
        let header = sb.hasCRC ? 64 : 16
        var end = raw.count
        if isBlockForm {
            let leafCount = Int(b.u32(at: raw.count - 8) ?? 0)
            guard leafCount <= (raw.count - header - 8) / 8 else {
                throw damaged("single-block directory of inode \(ino) claims \(leafCount) leaf entries", at: at + UInt64(raw.count - 8))
            }
            end = raw.count - 8 - leafCount * 8
        }
        var pos = header
        while pos < end {
            if b.u16(at: pos) == 0xFFFF {
                let length = Int(b.u16(at: pos + 2) ?? 0)
                guard length >= 8, length % 8 == 0, length <= end - pos else {
                    throw damaged("directory block of inode \(ino): free space at \(pos) has length \(length)", at: at + UInt64(pos))
                }
                pos += length
                continue
            }
            guard let entryIno = b.u64(at: pos), let nameLength = b.u8(at: pos + 8), nameLength > 0,
                  let name = b.slice(at: pos + 9, count: Int(nameLength)) else {
                throw damaged("directory block of inode \(ino): entry at \(pos) is truncated", at: at + UInt64(pos))
            }
            let fileType = sb.hasFileType ? b.u8(at: pos + 9 + Int(nameLength)) : nil
            let length = (8 + 1 + Int(nameLength) + (sb.hasFileType ? 1 : 0) + 2 + 7) & ~7
            guard length <= end - pos, b.u16(at: pos + length - 2) == UInt16(pos) else {
                throw damaged("directory block of inode \(ino): entry at \(pos) runs past the data area or has a wrong tag", at: at + UInt64(pos))
            }
            let isDot = (nameLength == 1 && name.first == 0x2E) || (nameLength == 2 && name.elementsEqual([0x2E, 0x2E]))
            if !isDot {
                guard out.count < XFSLimits.maxDirectoryEntries else {
                    throw CairnError(.unsupported, "directory inode \(ino) has more than \(XFSLimits.maxDirectoryEntries) entries", path: volume.name, offset: at)
                }
                out.append(DirectoryEntry(name: String(decoding: name, as: UTF8.self), node: entryIno,
                                          kind: fileType.flatMap { Self.kind(fileType: $0) }))
            }
            pos += length
        }
    }
}
