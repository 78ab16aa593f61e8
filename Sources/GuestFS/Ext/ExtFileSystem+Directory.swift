import CairnCore

extension ExtFileSystem {
    /// Largest directory read (bytes); Linux's large_dir directories stay far below this.
    static var maxDirectorySize: UInt64 { 4 << 30 }
    /// Directory bytes read per volume access.
    static var directoryChunk: UInt64 { 1 << 20 }

    package func directory(_ node: UInt64) throws -> [DirectoryEntry] {
        let i = try inode(node)
        guard i.kind == .directory else {
            throw CairnError(.malformedImage, "inode \(node) is not a directory", path: volume.name, offset: i.offset)
        }
        try refuseEncrypted(i)
        var out: [DirectoryEntry] = []
        if i.hasInlineData {
            // i_block: the parent's inode number (4 bytes), then entries to byte 60; the
            // system.data attribute continues with more entries.
            try parseEntries(Array(i.block[4...]), directory: i, at: i.offset + 0x2C, leafBlock: false, out: &out)
            if !i.inlineTail.isEmpty {
                try parseEntries(i.inlineTail, directory: i, at: i.offset, leafBlock: false, out: &out)
            }
            return out
        }
        guard i.size <= Self.maxDirectorySize, i.size <= volume.size else {
            throw CairnError(.malformedImage, "directory inode \(node) claims \(i.size) bytes", path: volume.name, offset: i.offset + 4,
                             hint: "the file system is damaged; run e2fsck on a restored copy")
        }
        let bs = UInt64(sb.blockSize)
        let size = i.size / bs * bs  // a partial last block is not a directory block
        var chunk = [UInt8](repeating: 0, count: Int(min(size, Self.directoryChunk)))
        var pos: UInt64 = 0
        while pos < size {
            let len = min(size - pos, Self.directoryChunk)
            var physicalOf: [UInt64: UInt64?] = [:]
            try chunk.withUnsafeMutableBytes { buf in
                try forEachPiece(i, from: pos, count: len) { logical, physical, length in
                    let dst = UnsafeMutableRawBufferPointer(rebasing: buf[Int(logical - pos)..<Int(logical - pos + length)])
                    if let physical {
                        try volume.read(into: dst, at: physical)
                    } else {
                        dst.initializeMemory(as: UInt8.self, repeating: 0)
                    }
                    var b = logical
                    while b < logical + length {
                        physicalOf[b] = physical.map { $0 + (b - logical) }
                        b += bs
                    }
                }
            }
            var k: UInt64 = 0
            while k < len {
                let start = Int(k)
                let block = Array(chunk[start..<start + Int(bs)])
                // A hole in a directory holds no entries.
                if case .some(.some(let physical)) = physicalOf[pos + k] {
                    try parseEntries(block, directory: i, at: physical, leafBlock: true, out: &out)
                }
                k += bs
            }
            pos += len
        }
        return out
    }

    /// Parses one stream of directory entries (inode u32, record length u16, name length u8,
    /// file type u8, name). A leaf block with metadata_csum ends in a 12-byte tail (inode 0,
    /// length 12, type 0xDE, crc32c); htree index blocks read as one empty entry.
    func parseEntries(_ bytes: [UInt8], directory i: ExtInode, at offset: UInt64, leafBlock: Bool, out: inout [DirectoryEntry]) throws {
        let b = CheckedBytes(bytes)
        func bad(_ what: String, _ field: Int) -> CairnError {
            CairnError(.malformedImage, "directory inode \(i.number): \(what)", path: volume.name, offset: offset + UInt64(field),
                       hint: "the file system is damaged; run e2fsck on a restored copy")
        }
        let count = bytes.count
        if leafBlock && sb.hasMetadataCsum && CRC32C.enforced && count >= 12 {
            let t = count - 12
            if b.u32(at: t) == 0, b.u16(at: t + 4) == 12, b.u8(at: t + 6) == 0, b.u8(at: t + 7) == 0xDE {
                let stored = b.u32(at: t + 8) ?? 0
                let computed = CRC32C.update(i.checksumSeed, bytes[0..<t])
                guard stored == computed else {
                    throw bad("block checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))", t + 8)
                }
            }
        }
        var pos = 0
        while pos + 8 <= count {
            let ino = UInt64(b.u32(at: pos) ?? 0)
            var recLen = Int(b.u16(at: pos + 4) ?? 0)
            if sb.blockSize >= 65536 && leafBlock {
                recLen = (recLen == 65535 || recLen == 0) ? 65536 : (recLen & 65532) | ((recLen & 3) << 16)
            }
            let nameLen = Int(b.u8(at: pos + 6) ?? 0)
            let type = b.u8(at: pos + 7) ?? 0
            guard recLen >= 8, recLen % 4 == 0, recLen <= count - pos, nameLen + 8 <= recLen else {
                throw bad("entry at byte \(pos) has record length \(recLen) and name length \(nameLen), which do not fit", pos + 4)
            }
            if ino != 0 {
                guard ino <= UInt64(sb.inodesCount) else { throw bad("entry at byte \(pos) names inode \(ino), past the last inode", pos) }
                let nameBytes = bytes[pos + 8..<pos + 8 + nameLen]
                let isDot = (nameLen == 1 && nameBytes.first == 0x2E) || (nameLen == 2 && nameBytes.allSatisfy { $0 == 0x2E })
                if nameLen > 0 && !isDot {
                    out.append(DirectoryEntry(name: String(decoding: nameBytes, as: UTF8.self), node: ino,
                                              kind: sb.hasFiletype ? Self.kind(ofDirentType: type) : nil))
                }
            }
            pos += recLen
        }
    }

    static func kind(ofDirentType t: UInt8) -> FileKind? { FileKind(direntType: t) }
}
