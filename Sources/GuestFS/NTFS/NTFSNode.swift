import CairnCore
import Synchronization

/// One name of a file ($FILE_NAME attribute or index key). Layout of the value:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | parent directory reference (low 48 bits: record number) |
/// | 8 | 32 | creation, modification, MFT change and access times |
/// | 40 | 8 | allocated size (copy) |
/// | 48 | 8 | data size (copy) |
/// | 56 | 4 | file attributes (copy) |
/// | 64 | 1 | name length in UTF-16 units |
/// | 65 | 1 | namespace: 0 POSIX, 1 Win32, 2 DOS, 3 Win32 and DOS |
/// | 66 | 2n | name, UTF-16LE |
struct NTFSName: Sendable, Equatable {
    var parent: UInt64
    var name: String
    var namespace: UInt8

    static let dosNamespace: UInt8 = 2

    init?(_ value: ArraySlice<UInt8>) {
        let b = CheckedBytes(Array(value))
        guard let parent = b.u64(at: 0), let length = b.u8(at: 64), let ns = b.u8(at: 65),
              let units = b.slice(at: 66, count: 2 * Int(length)) else { return nil }
        self.parent = parent & 0x0000_FFFF_FFFF_FFFF
        self.name = ntfsUTF16String(units)
        self.namespace = ns
    }
}

/// An attribute value: kept in the record (resident) or mapped by a runlist.
enum NTFSValue: Sendable {
    case resident([UInt8])
    case nonResident(NTFSStream)

    var size: UInt64 {
        switch self {
        case .resident(let b): UInt64(b.count)
        case .nonResident(let s): s.dataSize
        }
    }
}

/// A file, gathered from its base MFT record and the extension records its
/// $ATTRIBUTE_LIST names.
struct NTFSNode: Sendable {
    var record: UInt64
    var kind: FileKind
    var fileAttributes: UInt32
    var created: FileTime
    var modified: FileTime
    var changed: FileTime
    var accessed: FileTime
    var names: [NTFSName]
    /// The unnamed $DATA stream (named streams are ignored).
    var data: NTFSValue?
    /// $INDEX_ROOT and $INDEX_ALLOCATION named "$I30" (directories).
    var indexRoot: [UInt8]?
    var indexAllocation: NTFSStream?
    var linkTarget: String?
    var device: UInt64 = 0

    var runCount: Int {
        var n = 0
        if case .nonResident(let s) = data { n += s.runs.count }
        n += indexAllocation?.runs.count ?? 0
        return n
    }
}

/// Parsed nodes and directory listings, bounded in count, runlist entries and directory
/// entries held (each part is emptied when full).
final class NTFSCache: Sendable {
    private struct State {
        var nodes: [UInt64: NTFSNode] = [:]
        var runs = 0
    }
    private struct Listings {
        var directories: [UInt64: [DirectoryEntry]] = [:]
        var entries = 0
    }
    private let state = Mutex(State())
    private let listings = Mutex(Listings())
    static let maxCachedRuns = 4 << 20
    static let maxCachedDirectoryEntries = 1 << 20
    static let maxCachedDirectories = 1024

    func directory(_ n: UInt64) -> [DirectoryEntry]? {
        listings.withLock { $0.directories[n] }
    }

    func store(directory n: UInt64, _ entries: [DirectoryEntry]) {
        listings.withLock { l in
            if l.directories.count >= Self.maxCachedDirectories || l.entries + entries.count > Self.maxCachedDirectoryEntries {
                l.directories.removeAll(keepingCapacity: true)
                l.entries = 0
            }
            guard entries.count <= Self.maxCachedDirectoryEntries else { return }
            l.directories[n] = entries
            l.entries += entries.count
        }
    }

    func node(_ n: UInt64) -> NTFSNode? {
        state.withLock { $0.nodes[n] }
    }

    func store(_ node: NTFSNode) {
        state.withLock { s in
            if s.nodes.count >= NTFSConstants.nodeCacheCapacity || s.runs + node.runCount > Self.maxCachedRuns {
                s.nodes.removeAll(keepingCapacity: true)
                s.runs = 0
            }
            guard node.runCount <= Self.maxCachedRuns else { return }
            s.nodes[node.record] = node
            s.runs += node.runCount
        }
    }
}

extension NTFSFileSystem {
    /// Byte offset in the volume of byte `logical` of `stream`, for messages.
    static func physicalOffset(_ stream: NTFSStream, _ logical: UInt64, clusterSize: Int) -> UInt64? {
        let cs = UInt64(clusterSize)
        guard let ri = stream.runIndex(containing: logical / cs), let lcn = stream.runs[ri].lcn else { return nil }
        return mul(lcn + (logical / cs - stream.runs[ri].vcn), cs).flatMap { add($0, logical % cs) }
    }

    /// Reads and parses MFT record `n` through the $MFT runlist `mft`.
    static func readRecord(_ n: UInt64, mft: NTFSStream, boot: NTFSBootSector, reader: NTFSStreamReader) throws -> NTFSRecord {
        let rs = UInt64(boot.recordSize)
        guard let off = mul(n, rs), off < mft.dataSize, rs <= mft.dataSize - off else {
            throw reader.damaged("MFT record \(n) lies past the end of the MFT (\(mft.dataSize / rs) records)")
        }
        var raw = [UInt8](repeating: 0, count: boot.recordSize)
        let got = try raw.withUnsafeMutableBytes { try reader.read(mft, at: off, into: $0, what: "$MFT record \(n)") }
        guard got == raw.count else { throw reader.damaged("MFT record \(n) is cut short") }
        let phys = physicalOffset(mft, off, clusterSize: boot.clusterSize) ?? off
        return try NTFSRecord(number: n, raw: raw, offset: phys, volume: reader.volume.name, totalClusters: boot.totalClusters)
    }

    /// Joins the extents of one non-resident attribute (or takes a resident value). Extents
    /// must follow each other without gaps, starting at VCN 0; sizes come from the first.
    static func joinExtents(_ extents: [NTFSAttribute], what: String, reader: NTFSStreamReader) throws -> NTFSValue {
        guard let first = extents.first else { throw reader.damaged("\(what) is missing") }
        if let value = first.resident {
            guard extents.count == 1 else {
                throw reader.damaged("\(what) is resident in record \(first.record) but has \(extents.count) instances", offset: first.volumeOffset)
            }
            return .resident(value)
        }
        let sorted = extents.sorted { $0.lowestVCN < $1.lowestVCN }
        guard sorted[0].lowestVCN == 0 else {
            throw reader.damaged("\(what) has no extent starting at VCN 0", offset: sorted[0].volumeOffset)
        }
        var runs: [NTFSRun] = []
        var next: UInt64 = 0
        for e in sorted {
            guard e.resident == nil else { throw reader.damaged("\(what) mixes resident and non-resident instances", offset: e.volumeOffset) }
            guard e.lowestVCN == next else {
                throw reader.damaged("\(what): extent in record \(e.record) starts at VCN \(e.lowestVCN), expected \(next) (gap or overlap)",
                                     offset: e.volumeOffset)
            }
            guard runs.count + e.runs.count <= NTFSConstants.maxRuns else {
                throw reader.damaged("\(what) has more than \(NTFSConstants.maxRuns) runs", offset: e.volumeOffset)
            }
            runs += e.runs
            next = runs.last.map { $0.vcn + $0.length } ?? next
        }
        let head = sorted[0]
        return .nonResident(NTFSStream(runs: runs, dataSize: head.dataSize, initializedSize: min(head.initializedSize, head.dataSize),
                                       allocatedSize: head.allocatedSize, compressionUnit: head.compressionUnit, flags: head.flags))
    }

    /// The bytes of a small attribute value (resident, or non-resident up to `limit`).
    static func smallValue(_ value: NTFSValue, limit: Int, what: String, reader: NTFSStreamReader) throws -> [UInt8] {
        switch value {
        case .resident(let b): return b
        case .nonResident(let s): return try reader.readAll(s, limit: limit, what: what)
        }
    }

    /// The records named by an $ATTRIBUTE_LIST value, in order of first appearance, with the
    /// types listed for each. Entry layout: type (u32 at 0), entry length (u16 at 4), name
    /// length (u8 at 6), name offset (u8 at 7), lowest VCN (u64 at 8), record reference
    /// (u64 at 16, low 48 bits), attribute id (u16 at 24).
    static func attributeListEntries(_ bytes: [UInt8], what: String, reader: NTFSStreamReader) throws -> [(type: UInt32, name: String, record: UInt64)] {
        let b = CheckedBytes(bytes)
        var out: [(type: UInt32, name: String, record: UInt64)] = []
        var p = 0
        while p + 26 <= bytes.count {
            guard let type = b.u32(at: p), let len = b.u16(at: p + 4).map(Int.init), let nameLength = b.u8(at: p + 6),
                  let nameOffset = b.u8(at: p + 7), let ref = b.u64(at: p + 16) else { break }
            if type == 0 && len == 0 { break }
            guard len >= 26, len <= bytes.count - p else {
                throw reader.damaged("\(what): $ATTRIBUTE_LIST entry at \(p) has a bad length \(len)")
            }
            var name = ""
            if nameLength > 0 {
                guard Int(nameOffset) + 2 * Int(nameLength) <= len, let units = b.slice(at: p + Int(nameOffset), count: 2 * Int(nameLength)) else {
                    throw reader.damaged("\(what): $ATTRIBUTE_LIST entry at \(p) has its name outside the entry")
                }
                name = ntfsUTF16String(units)
            }
            out.append((type, name, ref & 0x0000_FFFF_FFFF_FFFF))
            p += len
        }
        return out
    }

    /// The parsed node `n` (cached).
    func node(_ n: UInt64) throws -> NTFSNode {
        if let cached = cache.node(n) { return cached }
        let node = try loadNode(n)
        cache.store(node)
        return node
    }

    private func loadNode(_ n: UInt64) throws -> NTFSNode {
        let base = try Self.readRecord(n, mft: mft, boot: boot, reader: reader)
        guard base.inUse else {
            throw reader.damaged("MFT record \(n) is not in use (a directory entry or reference points to a deleted file)")
        }
        guard base.baseRecord == 0 else {
            throw reader.damaged("MFT record \(n) is an extension record of record \(base.baseRecord), not a file")
        }
        var attributes = base.attributes
        if let list = attributes.first(where: { $0.type == NTFSConstants.attributeList }) {
            let value = try Self.joinExtents([list], what: "$ATTRIBUTE_LIST of record \(n)", reader: reader)
            let bytes = try Self.smallValue(value, limit: NTFSConstants.maxAttributeListSize, what: "$ATTRIBUTE_LIST of record \(n)", reader: reader)
            var seen: Set<UInt64> = [n]
            for entry in try Self.attributeListEntries(bytes, what: "record \(n)", reader: reader) where seen.insert(entry.record).inserted {
                guard seen.count <= NTFSConstants.maxExtensionRecords else {
                    throw reader.damaged("record \(n) has more than \(NTFSConstants.maxExtensionRecords) extension records")
                }
                let ext = try Self.readRecord(entry.record, mft: mft, boot: boot, reader: reader)
                guard ext.inUse, ext.baseRecord == n else {
                    throw reader.damaged("extension record \(entry.record) listed by record \(n) belongs to record \(ext.baseRecord)\(ext.inUse ? "" : " and is not in use")")
                }
                attributes += ext.attributes.filter { $0.type != NTFSConstants.attributeList }
                guard attributes.count <= NTFSConstants.maxAttributes else {
                    throw reader.damaged("record \(n) has more than \(NTFSConstants.maxAttributes) attributes")
                }
            }
        }
        return try buildNode(n, isDirectoryRecord: base.isDirectory, attributes: attributes)
    }

    private func buildNode(_ n: UInt64, isDirectoryRecord: Bool, attributes: [NTFSAttribute]) throws -> NTFSNode {
        guard let si = attributes.first(where: { $0.type == NTFSConstants.standardInformation })?.resident, si.count >= 36 else {
            throw reader.damaged("record \(n) has no usable $STANDARD_INFORMATION")
        }
        let s = CheckedBytes(si)
        var node = NTFSNode(record: n, kind: .regular, fileAttributes: s.u32(at: 32) ?? 0,
                            created: ntfsTime(s.u64(at: 0) ?? 0), modified: ntfsTime(s.u64(at: 8) ?? 0),
                            changed: ntfsTime(s.u64(at: 16) ?? 0), accessed: ntfsTime(s.u64(at: 24) ?? 0), names: [])
        node.names = attributes.filter { $0.type == NTFSConstants.fileName }.compactMap { $0.resident.flatMap { NTFSName($0[...]) } }
        let data = attributes.filter { $0.type == NTFSConstants.data && $0.name.isEmpty }
        if !data.isEmpty { node.data = try Self.joinExtents(data, what: "$DATA of record \(n)", reader: reader) }
        if isDirectoryRecord {
            node.kind = .directory
            node.indexRoot = attributes.first { $0.type == NTFSConstants.indexRoot && $0.name == "$I30" }?.resident
            let alloc = attributes.filter { $0.type == NTFSConstants.indexAllocation && $0.name == "$I30" }
            if !alloc.isEmpty, case .nonResident(let st) = try Self.joinExtents(alloc, what: "$INDEX_ALLOCATION of record \(n)", reader: reader) {
                node.indexAllocation = st
            }
        }
        if node.fileAttributes & NTFSConstants.fileReparsePoint != 0,
           let rp = attributes.filter({ $0.type == NTFSConstants.reparsePoint }).first {
            let value = try Self.joinExtents([rp], what: "$REPARSE_POINT of record \(n)", reader: reader)
            let bytes = try Self.smallValue(value, limit: 64 << 10, what: "$REPARSE_POINT of record \(n)", reader: reader)
            if let target = Self.reparseTarget(bytes) {
                node.kind = .symlink
                node.linkTarget = target
            }
        } else if node.kind == .regular, node.fileAttributes & NTFSConstants.fileSystem != 0, let d = node.data, d.size >= 8, d.size <= 8 + 2 * 8192 {
            try interpretInterix(&node, data: d)
        }
        return node
    }

    /// ntfs-3g's Interix files (system files whose data starts with a type tag): symlinks
    /// ("IntxLNK\1" + UTF-16LE target), character and block devices ("IntxCHR\0" /
    /// "IntxBLK\0" + major u64 + minor u64).
    private func interpretInterix(_ node: inout NTFSNode, data: NTFSValue) throws {
        let bytes: [UInt8]
        switch data {
        case .resident(let b): bytes = b
        case .nonResident(let s): bytes = try reader.readAll(s, limit: 8 + 2 * 8192, what: "$DATA of record \(node.record)")
        }
        let b = CheckedBytes(bytes)
        guard let tag = b.slice(at: 0, count: 8).map(Array.init) else { return }
        if tag == Array("IntxLNK\u{1}".utf8), bytes.count % 2 == 0 {
            node.kind = .symlink
            node.linkTarget = ntfsUTF16String(bytes[8...])
        } else if tag == Array("IntxCHR\0".utf8) || tag == Array("IntxBLK\0".utf8), bytes.count == 24,
                  let major = b.u64(at: 8), let minor = b.u64(at: 16), major < 1 << 12, minor < 1 << 20 {
            node.kind = tag[4] == UInt8(ascii: "C") ? .characterDevice : .blockDevice
            node.device = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
        }
    }

    /// The link target of a reparse point that is a symbolic link (IO_REPARSE_TAG_SYMLINK),
    /// junction (IO_REPARSE_TAG_MOUNT_POINT) or WSL symlink (IO_REPARSE_TAG_LX_SYMLINK); nil
    /// for other tags. Windows paths get '/' separators; absolute ones ("\??\C:\dir") lose
    /// the "\??\" prefix and drive letter and start at this file system's root.
    static func reparseTarget(_ bytes: [UInt8]) -> String? {
        let b = CheckedBytes(bytes)
        guard let tag = b.u32(at: 0), let dataLength = b.u16(at: 4) else { return nil }
        let end = min(bytes.count, 8 + Int(dataLength))
        switch tag {
        case NTFSConstants.tagLXSymlink:
            guard end > 12 else { return nil }
            return String(decoding: bytes[12..<end], as: UTF8.self)
        case NTFSConstants.tagSymlink, NTFSConstants.tagMountPoint:
            let bufferStart = tag == NTFSConstants.tagSymlink ? 20 : 16
            guard let subOff = b.u16(at: 8), let subLen = b.u16(at: 10), let printOff = b.u16(at: 12), let printLen = b.u16(at: 14) else { return nil }
            let relative = tag == NTFSConstants.tagSymlink && (b.u32(at: 16) ?? 0) & 1 != 0
            func name(_ off: UInt16, _ len: UInt16) -> String? {
                let start = bufferStart + Int(off)
                guard len > 0, start + Int(len) <= end else { return nil }
                return ntfsUTF16String(bytes[start..<start + Int(len)])
            }
            guard var target = name(printOff, printLen) ?? name(subOff, subLen) else { return nil }
            if !relative {
                for prefix in ["\\??\\", "\\\\?\\"] where target.hasPrefix(prefix) { target.removeFirst(prefix.count) }
                let chars = Array(target)
                if chars.count >= 2, chars[1] == ":", chars[0].isLetter { target = String(chars.dropFirst(2)) }
                if !target.hasPrefix("\\") { target = "\\" + target }
            }
            return String(target.map { $0 == "\\" ? "/" : $0 })
        default:
            return nil
        }
    }
}
