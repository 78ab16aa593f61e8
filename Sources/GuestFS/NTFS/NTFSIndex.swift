import CairnCore

/// Directory indexes ($I30): a B-tree whose root node lives in $INDEX_ROOT and whose other
/// nodes are "INDX" blocks in $INDEX_ALLOCATION.
///
/// $INDEX_ROOT value: indexed attribute type (u32 at 0, 0x30), collation rule (u32 at 4),
/// index block size (u32 at 8), clusters per index block (u8 at 12), then a node header at 16.
/// INDX block: magic (0), fixups (4, 6), VCN of the block (u64 at 16), node header at 24.
/// Node header (offsets relative to itself): first entry (u32 at 0), end of entries (u32 at
/// 4), allocated size (u32 at 8), flags (u8 at 12; 1 = has sub-nodes).
/// Index entry: file reference (u64 at 0), entry length (u16 at 8), key length (u16 at 10),
/// flags (u16 at 12; 1 = has a sub-node, 2 = last entry), the key (a $FILE_NAME value) at 16,
/// and with a sub-node the sub-node's VCN in the entry's last 8 bytes.
extension NTFSFileSystem {
    private struct IndexWalk {
        var visited: Set<UInt64> = []
        var entries: [DirectoryEntry] = []
    }

    func listDirectory(_ n: UInt64) throws -> [DirectoryEntry] {
        let dir = try node(n)
        guard dir.kind == .directory else {
            throw CairnError(.malformedImage, "MFT record \(n) is not a directory", path: volume.name)
        }
        guard let root = dir.indexRoot else {
            throw reader.damaged("directory record \(n) has no $INDEX_ROOT named $I30")
        }
        let r = CheckedBytes(root)
        guard let indexed = r.u32(at: 0), indexed == NTFSConstants.fileName, let blockSize32 = r.u32(at: 8) else {
            throw reader.damaged("directory record \(n): $INDEX_ROOT does not index file names")
        }
        var walk = IndexWalk()
        try walkNode(root, headerAt: 16, depth: 0, dir: n, blockSize: Int(blockSize32), allocation: dir.indexAllocation, walk: &walk)
        return walk.entries
    }

    /// Visits the entries of one B-tree node in order, descending into sub-nodes first.
    private func walkNode(_ bytes: [UInt8], headerAt h: Int, depth: Int, dir: UInt64, blockSize: Int,
                          allocation: NTFSStream?, walk: inout IndexWalk) throws {
        let b = CheckedBytes(bytes)
        guard let first = b.u32(at: h), let end = b.u32(at: h + 4),
              let start = Int(exactly: first).map({ $0 + h }), let stop = Int(exactly: end).map({ $0 + h }),
              start <= stop, stop <= bytes.count else {
            throw reader.damaged("directory record \(dir): index node header at \(h) points outside the node")
        }
        var p = start
        while p < stop {
            guard let ref = b.u64(at: p), let len = b.u16(at: p + 8).map(Int.init), let keyLength = b.u16(at: p + 10).map(Int.init),
                  let flags = b.u16(at: p + 12) else {
                throw reader.damaged("directory record \(dir): index entry at \(p) is truncated")
            }
            guard len >= 16, len <= stop - p else {
                throw reader.damaged("directory record \(dir): index entry at \(p) has a bad length \(len)")
            }
            if flags & 1 != 0 {
                guard len >= 24, let vcn = b.u64(at: p + len - 8) else {
                    throw reader.damaged("directory record \(dir): index entry at \(p) has no room for its sub-node VCN")
                }
                try walkBlock(vcn, depth: depth + 1, dir: dir, blockSize: blockSize, allocation: allocation, walk: &walk)
            }
            if flags & 2 != 0 { break }
            guard 16 + keyLength <= len, let key = b.slice(at: p + 16, count: keyLength), let name = NTFSName(key) else {
                throw reader.damaged("directory record \(dir): index entry at \(p) has a bad key (\(keyLength) bytes)")
            }
            let target = ref & 0x0000_FFFF_FFFF_FFFF
            if name.namespace != NTFSName.dosNamespace, target >= NTFSConstants.firstUserRecord {
                guard walk.entries.count < NTFSConstants.maxDirectoryEntries else {
                    throw reader.damaged("directory record \(dir) has more than \(NTFSConstants.maxDirectoryEntries) entries")
                }
                walk.entries.append(DirectoryEntry(name: name.name, node: target))
            }
            p += len
        }
    }

    private func walkBlock(_ vcn: UInt64, depth: Int, dir: UInt64, blockSize: Int, allocation: NTFSStream?,
                           walk: inout IndexWalk) throws {
        guard depth <= NTFSConstants.maxIndexDepth else {
            throw reader.damaged("directory record \(dir): index B-tree is deeper than \(NTFSConstants.maxIndexDepth) levels")
        }
        guard let allocation else {
            throw reader.damaged("directory record \(dir): index entry points to sub-node VCN \(vcn) but there is no $INDEX_ALLOCATION")
        }
        guard walk.visited.insert(vcn).inserted else {
            throw reader.damaged("directory record \(dir): index block VCN \(vcn) is reached twice (the index loops)")
        }
        guard walk.visited.count <= NTFSConstants.maxIndexBlocks else {
            throw reader.damaged("directory record \(dir): more than \(NTFSConstants.maxIndexBlocks) index blocks")
        }
        guard blockSize >= 512, blockSize <= NTFSConstants.maxRecordSize, blockSize.nonzeroBitCount == 1 else {
            throw reader.damaged("directory record \(dir): index block size \(blockSize) is not a power of two in 512...\(NTFSConstants.maxRecordSize)")
        }
        let unit = UInt64(blockSize >= boot.clusterSize ? boot.clusterSize : 512)
        guard let offset = mul(vcn, unit), offset < allocation.dataSize, UInt64(blockSize) <= allocation.dataSize - offset else {
            throw reader.damaged("directory record \(dir): index block VCN \(vcn) lies past the end of $INDEX_ALLOCATION (\(allocation.dataSize) bytes)")
        }
        var block = [UInt8](repeating: 0, count: blockSize)
        _ = try block.withUnsafeMutableBytes { try reader.read(allocation, at: offset, into: $0, what: "$INDEX_ALLOCATION of record \(dir)") }
        let phys = Self.physicalOffset(allocation, offset, clusterSize: boot.clusterSize)
        guard Array(block.prefix(4)) == NTFSConstants.indexMagic else {
            throw reader.damaged("directory record \(dir): index block VCN \(vcn) has no \"INDX\" magic", offset: phys)
        }
        if let problem = ntfsApplyFixups(&block) {
            throw reader.damaged("directory record \(dir): index block VCN \(vcn) update sequence: \(problem)", offset: phys)
        }
        guard let ownVCN = CheckedBytes(block).u64(at: 16), ownVCN == vcn || !CRC32C.enforced else {
            throw reader.damaged("directory record \(dir): index block at VCN \(vcn) says it is VCN \(CheckedBytes(block).u64(at: 16) ?? 0)", offset: phys)
        }
        try walkNode(block, headerAt: 24, depth: depth, dir: dir, blockSize: blockSize, allocation: allocation, walk: &walk)
    }
}
