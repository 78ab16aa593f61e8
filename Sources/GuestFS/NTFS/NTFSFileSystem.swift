import CairnCore

/// A read-only NTFS reader (versions 1.2 and 3.x, as written by Windows NT 4 to 11 and
/// ntfs-3g). Nodes are MFT record numbers; the root directory is record 5. See docs/NTFS.md
/// for the structures used, what is refused and the limits.
package struct NTFSFileSystem: FileSystem {
    package let volume: any BlockSource
    let boot: NTFSBootSector
    /// The $MFT's own unnamed $DATA stream: record N is at byte N * record size in it.
    let mft: NTFSStream
    let reader: NTFSStreamReader
    let cache = NTFSCache()
    package let label: String
    /// NTFS version from $Volume's $VOLUME_INFORMATION (major, minor).
    let version: (major: UInt8, minor: UInt8)

    package var typeName: String { "ntfs" }
    package var uuid: String? {
        let digits = String(boot.serial, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, 16 - digits.count)) + digits
    }
    package var blockSize: Int { boot.clusterSize }
    package var rootNode: UInt64 { NTFSConstants.rootRecord }

    /// Cheap check for an NTFS boot sector: OEM id, signature and sane geometry.
    package static func probe(_ volume: any BlockSource) -> Bool {
        guard volume.size >= 512, let bytes = try? volume.readBytes(at: 0, count: 512) else { return false }
        var why = ""
        return NTFSBootSector(CheckedBytes(bytes), why: &why) != nil
    }

    package init(volume: any BlockSource) throws {
        self.volume = volume
        guard volume.size >= 512 else {
            throw CairnError(.malformedImage, "volume of \(volume.size) bytes is too small for NTFS", path: volume.name)
        }
        var why = ""
        guard let boot = NTFSBootSector(CheckedBytes(try volume.readBytes(at: 0, count: 512)), why: &why) else {
            throw CairnError(.malformedImage, "not an NTFS boot sector: \(why)", path: volume.name, offset: 0)
        }
        self.boot = boot
        self.reader = NTFSStreamReader(volume: volume, clusterSize: boot.clusterSize)
        mft = try Self.bootstrapMFT(boot: boot, reader: self.reader)
        let mftRecords = mft.dataSize / UInt64(boot.recordSize)
        guard mftRecords > NTFSConstants.firstUserRecord / 2 else {
            throw self.reader.damaged("the MFT has only \(mftRecords) records; the system files are missing")
        }
        // $Volume: label and version.
        let volRecord = try Self.readRecord(NTFSConstants.volumeRecord, mft: mft, boot: boot, reader: self.reader)
        var label = ""
        var version: (UInt8, UInt8) = (3, 1)
        for a in volRecord.attributes {
            if a.type == NTFSConstants.volumeName, let v = a.resident { label = ntfsUTF16String(v[...]) }
            if a.type == NTFSConstants.volumeInformation, let v = a.resident, v.count >= 10 { version = (v[8], v[9]) }
        }
        guard version.0 == 1 || version.0 == 3 else {
            throw CairnError(.unsupported, "NTFS version \(version.0).\(version.1) is not supported (1.x and 3.x are)", path: volume.name)
        }
        self.label = label
        self.version = version
    }

    /// Reads record 0 at the boot sector's MFT LCN and assembles the $MFT's $DATA runlist,
    /// following its $ATTRIBUTE_LIST into extension records when the MFT is so fragmented
    /// that its runlist does not fit in one record.
    static func bootstrapMFT(boot: NTFSBootSector, reader: NTFSStreamReader) throws -> NTFSStream {
        guard let start = mul(boot.mftLCN, UInt64(boot.clusterSize)), start < reader.volume.size,
              UInt64(boot.recordSize) <= reader.volume.size - start else {
            throw reader.damaged("the MFT (LCN \(boot.mftLCN)) lies past the end of the volume", offset: 48)
        }
        let raw = try reader.volume.readBytes(at: start, count: boot.recordSize)
        let record0 = try NTFSRecord(number: 0, raw: raw, offset: start, volume: reader.volume.name, totalClusters: boot.totalClusters)
        guard record0.inUse else { throw reader.damaged("MFT record 0 ($MFT) is not in use", offset: start) }
        var extents = record0.attributes.filter { $0.type == NTFSConstants.data && $0.name.isEmpty }
        guard let first = extents.first, first.resident == nil else {
            throw reader.damaged("MFT record 0 ($MFT) has no non-resident $DATA attribute", offset: start)
        }
        guard case .nonResident(var stream) = try joinExtents(extents, what: "$DATA of $MFT", reader: reader) else {
            throw reader.damaged("$DATA of $MFT is resident", offset: start)
        }
        if let list = record0.attributes.first(where: { $0.type == NTFSConstants.attributeList }) {
            let value = try joinExtents([list], what: "$ATTRIBUTE_LIST of $MFT", reader: reader)
            let bytes = try smallValue(value, limit: NTFSConstants.maxAttributeListSize, what: "$ATTRIBUTE_LIST of $MFT", reader: reader)
            var seen: Set<UInt64> = [0]
            for e in try attributeListEntries(bytes, what: "$MFT", reader: reader)
            where e.type == NTFSConstants.data && e.name.isEmpty && seen.insert(e.record).inserted {
                guard seen.count <= NTFSConstants.maxExtensionRecords else {
                    throw reader.damaged("$MFT has more than \(NTFSConstants.maxExtensionRecords) extension records")
                }
                let ext = try readRecord(e.record, mft: stream, boot: boot, reader: reader)
                guard ext.inUse, ext.baseRecord == 0 else {
                    throw reader.damaged("extension record \(e.record) listed by $MFT belongs to record \(ext.baseRecord)")
                }
                extents += ext.attributes.filter { $0.type == NTFSConstants.data && $0.name.isEmpty }
                guard case .nonResident(let s) = try joinExtents(extents, what: "$DATA of $MFT", reader: reader) else {
                    throw reader.damaged("$DATA of $MFT is resident", offset: start)
                }
                stream = s
            }
        }
        guard stream.dataSize >= UInt64(boot.recordSize) else {
            throw reader.damaged("$DATA of $MFT is shorter than one record", offset: start)
        }
        guard !stream.isCompressed, !stream.isEncrypted else {
            throw reader.damaged("$DATA of $MFT is compressed or encrypted", offset: start)
        }
        return stream
    }

    // MARK: - FileSystem

    package func metadata(of n: UInt64) throws -> FileMetadata {
        let node = try node(n)
        let size: UInt64
        switch node.kind {
        case .regular: size = node.data?.size ?? 0
        case .symlink: size = UInt64(node.linkTarget?.utf8.count ?? 0)
        default: size = 0
        }
        let permissions: UInt32
        switch node.kind {
        case .directory: permissions = 0o755
        case .symlink: permissions = 0o777
        default: permissions = node.fileAttributes & NTFSConstants.fileReadOnly != 0 ? 0o444 : 0o644
        }
        let links = node.names.filter { $0.namespace != NTFSName.dosNamespace }.count
        return FileMetadata(kind: node.kind, permissions: permissions, size: size, linkCount: UInt32(max(1, min(links, 65535))),
                            modified: node.modified, accessed: node.accessed, changed: node.changed, created: node.created,
                            device: node.device)
    }

    package func directory(_ n: UInt64) throws -> [DirectoryEntry] {
        if let cached = cache.directory(n) { return cached }
        let entries = try listDirectory(n)
        cache.store(directory: n, entries)
        return entries
    }

    package func readLink(_ n: UInt64) throws -> String {
        let node = try node(n)
        guard node.kind == .symlink, let target = node.linkTarget else {
            throw CairnError(.malformedImage, "MFT record \(n) is not a symbolic link", path: volume.name)
        }
        return target
    }

    package func read(_ n: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let node = try node(n)
        guard node.kind == .regular else {
            throw CairnError(.malformedImage, "MFT record \(n) is not a regular file", path: volume.name)
        }
        switch node.data {
        case nil:
            return 0
        case .resident(let bytes):
            guard offset < UInt64(bytes.count) else { return 0 }
            let start = Int(offset)
            let count = min(buffer.count, bytes.count - start)
            bytes.withUnsafeBytes { src in
                UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count]).copyMemory(from: UnsafeRawBufferPointer(rebasing: src[start..<start + count]))
            }
            return count
        case .nonResident(let stream):
            return try reader.read(stream, at: offset, into: buffer, what: "$DATA of record \(n)")
        }
    }

    /// The runlist of the unnamed $DATA stream: nil for resident, compressed and encrypted
    /// data; sparse runs and everything from the initialized size to the data size (which
    /// reads as zeros) are holes. Throws, as `read` does, when a run is missing below the
    /// initialized size or maps past the volume.
    package func fileExtents(_ n: UInt64) throws -> [FileExtent]? {
        let node = try node(n)
        guard node.kind == .regular else {
            throw CairnError(.usage, "MFT record \(n) is not a regular file (\(node.kind.rawValue)); only regular files have extents", path: volume.name)
        }
        guard case .nonResident(let s)? = node.data else { return node.data == nil ? [] : nil }
        if s.isCompressed || s.isEncrypted { return nil }
        let cs = UInt64(boot.clusterSize)
        let initialized = min(s.initializedSize, s.dataSize)
        var out: [FileExtent] = []
        var pos: UInt64 = 0
        // Every step ends at a run's end (a cluster boundary) or at the initialized size.
        while pos < initialized {
            let vcn = pos / cs
            guard let ri = s.runIndex(containing: vcn) else {
                throw reader.damaged("$DATA of record \(n): no run maps byte \(pos) (VCN \(vcn)) although the attribute is initialized up to \(s.initializedSize)")
            }
            let run = s.runs[ri]
            let length = min(initialized, mul(run.vcn + run.length, cs) ?? UInt64.max) - pos
            var physical: UInt64?
            if let lcn = run.lcn {
                guard let at = mul(lcn + (vcn - run.vcn), cs) else {
                    throw reader.damaged("$DATA of record \(n): run at VCN \(run.vcn) maps past the addressable range")
                }
                guard at <= volume.size, length <= volume.size - at else {
                    throw reader.damaged("$DATA of record \(n) data at VCN \(vcn) lies past the end of the volume (\(volume.size) bytes; truncated image?)", offset: at)
                }
                physical = at
            }
            out.append(logicalOffset: pos, physicalOffset: physical, length: length)
            pos += length
        }
        out.append(logicalOffset: pos, physicalOffset: nil, length: s.dataSize - pos)
        return out
    }

    /// Clusters whose bit is clear in $Bitmap (record 6), as byte ranges. Only clusters the
    /// bitmap initializes and that lie inside both the boot sector's volume size and the
    /// source count; the backup boot sector after the last cluster is never free.
    package func freeRanges() throws -> [Range<UInt64>] {
        let bitmapNode = try node(NTFSConstants.bitmapRecord)
        guard case .nonResident(let bitmap)? = bitmapNode.data else {
            throw reader.damaged("$Bitmap (record 6) has no non-resident $DATA")
        }
        let cs = UInt64(boot.clusterSize)
        let clusters = min(boot.totalClusters, volume.size / cs)
        // Only initialized bitmap bytes are trusted; bits past them count as used.
        let usableBytes = min(bitmap.initializedSize, bitmap.dataSize, (clusters + 7) / 8)
        var ranges: [Range<UInt64>] = []
        var runStart: UInt64? = nil
        let piece = 1 << 20
        var chunk = [UInt8](repeating: 0, count: piece)
        var byteOffset: UInt64 = 0
        func close(_ end: UInt64) {
            if let s = runStart {
                ranges.append(s * cs..<end * cs)
                runStart = nil
            }
        }
        while byteOffset < usableBytes {
            let n = Int(min(UInt64(piece), usableBytes - byteOffset))
            let got = try chunk.withUnsafeMutableBytes {
                try reader.read(bitmap, at: byteOffset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), what: "$DATA of $Bitmap")
            }
            guard got == n else { throw reader.damaged("$Bitmap is shorter than its size") }
            for i in 0..<n {
                let byte = chunk[i]
                let base = (byteOffset + UInt64(i)) * 8
                if byte == 0xFF { close(base); continue }
                if byte == 0x00, base + 8 <= clusters {
                    if runStart == nil { runStart = base }
                    continue
                }
                for bit in 0..<8 {
                    let c = base + UInt64(bit)
                    guard c < clusters else { break }
                    if byte & (1 << bit) == 0 {
                        if runStart == nil { runStart = c }
                    } else {
                        close(c)
                    }
                }
            }
            byteOffset += UInt64(n)
        }
        close(min(clusters, usableBytes * 8))
        return ranges
    }
}
