import CairnCore
import Synchronization

/// A VHD image (Microsoft Virtual PC / Hyper-V, QEMU's "vpc") read as a virtual disk: fixed,
/// dynamic or differencing.
///
/// - Fixed: the data, then the 512-byte footer.
/// - Dynamic: a footer copy at 0, the dynamic disk header ("cxsparse") at the footer's data
///   offset, the BAT (one big-endian 32-bit sector number per block, `0xFFFFFFFF` = unused)
///   and blocks made of a sector bitmap (one bit per 512-byte sector, most significant bit
///   first, padded to whole sectors) followed by the block's data.
/// - Differencing: like dynamic; unused blocks and sectors whose bitmap bit is clear come
///   from the parent. In a dynamic disk they read as zeros.
///
/// The virtual size is the footer's `current_size`. Both checksums are checked; every BAT
/// entry is checked before use. A block whose data runs past the end of the file reads the
/// missing tail as zeros. Safe for concurrent reads: the only mutable state is a cache of
/// sector bitmaps behind a mutex, filled outside the lock.
package final class VHDImage: BlockSource, Sendable {
    package let footer: VHDFooter
    /// The dynamic disk header; nil for a fixed disk.
    package let header: VHDDynamicHeader?
    package let file: any BlockSource
    package let parent: (any BlockSource)?
    package let size: UInt64
    package var name: String { file.name }
    package var isFixed: Bool { header == nil }
    package let isDifferencing: Bool
    /// The parent's name recorded in a differencing disk (unicode name, else a locator).
    package var parentName: String? {
        guard isDifferencing, let header else { return nil }
        return header.parentName.isEmpty ? header.parentLocatorPaths.first : header.parentName
    }

    private let fileSize: UInt64
    private let blockSize: UInt64
    private let sectorsPerBlock: UInt64
    /// Bytes of the sector bitmap in front of each block (whole sectors).
    private let bitmapBytes: UInt64
    private let bat: [UInt32]
    private let bitmaps: Mutex<BitmapCache>

    /// Opens `file` as a VHD.
    ///
    /// - Parameter parent: the image the user named as the parent of a differencing disk. We
    ///   never open a path recorded in the image; a differencing disk without `parent` is a
    ///   usage error naming the recorded parent, and `parent` for any other disk is one too.
    package init(file: any BlockSource, parent: (any BlockSource)? = nil) throws {
        let path = file.name
        let fileSize = file.size
        guard fileSize >= UInt64(VHD.footerSize) else {
            throw CairnError(.malformedImage, "file of \(fileSize) bytes is too small to hold a VHD footer (512 bytes)", path: path)
        }
        let footer = try Self.readFooter(file, fileSize: fileSize)
        guard footer.currentSize <= VHD.maxReadSize else {
            throw CairnError(.malformedImage, "VHD footer current size \(footer.currentSize) exceeds the format's 2 TiB limit", path: path,
                             offset: fileSize - 512 + UInt64(VHD.Footer.currentSize))
        }
        guard let type = VHD.DiskType(rawValue: footer.diskType) else {
            throw CairnError(.unsupported, "VHD disk type \(footer.diskType) is not fixed (2), dynamic (3) or differencing (4)", path: path,
                             offset: fileSize - 512 + UInt64(VHD.Footer.diskType))
        }
        self.footer = footer
        self.file = file
        self.fileSize = fileSize
        self.size = footer.currentSize
        self.isDifferencing = type == .differencing

        if type == .fixed {
            guard footer.currentSize <= fileSize - UInt64(VHD.footerSize) else {
                throw CairnError(.malformedImage, "fixed VHD current size \(footer.currentSize) does not fit in the file (\(fileSize) bytes including the footer)",
                                 path: path, hint: "the file was probably truncated")
            }
            if let parent {
                throw CairnError(.usage, "fixed VHD has no parent, but parent image '\(parent.name)' was given", path: path, hint: "drop --backing for this image")
            }
            self.header = nil
            self.parent = nil
            self.blockSize = 0
            self.sectorsPerBlock = 0
            self.bitmapBytes = 0
            self.bat = []
            self.bitmaps = Mutex(BitmapCache(capacity: 0))
            return
        }

        // Dynamic and differencing disks: the header, then the BAT.
        let headerOffset = footer.dataOffset
        guard headerOffset < fileSize, UInt64(VHD.dynamicHeaderSize) <= fileSize - headerOffset else {
            throw CairnError(.malformedImage, "VHD footer data offset \(hex(headerOffset)) (dynamic disk header) lies past the end of the file (size \(fileSize))",
                             path: path, offset: fileSize - 512 + UInt64(VHD.Footer.dataOffset))
        }
        let header = try VHDDynamicHeader.parse(try file.readBytes(at: headerOffset, count: VHD.dynamicHeaderSize),
                                                path: path, at: headerOffset, fileSize: fileSize) { offset, count in
            try file.readBytes(at: offset, count: count)
        }
        let blockSize = header.blockSize
        guard blockSize >= VHD.minBlockSize, blockSize <= VHD.maxBlockSize, blockSize & (blockSize - 1) == 0 else {
            throw CairnError(.malformedImage, "VHD block size \(blockSize) is not a power of two from 512 bytes to 256 MiB",
                             path: path, offset: headerOffset + UInt64(VHD.Header.blockSize))
        }
        let block = UInt64(blockSize)
        let needed = (footer.currentSize + block - 1) / block
        guard UInt64(header.maxTableEntries) >= needed else {
            throw CairnError(.malformedImage, "VHD max table entries \(header.maxTableEntries) cannot map the virtual size \(footer.currentSize) with \(blockSize)-byte blocks (\(needed) needed)",
                             path: path, offset: headerOffset + UInt64(VHD.Header.maxTableEntries))
        }
        guard needed * 4 <= VHD.maxBATBytes else {
            throw CairnError(.unsupported, "VHD BAT of \(needed) entries is larger than 64 MiB", path: path, offset: headerOffset + UInt64(VHD.Header.maxTableEntries))
        }
        let tableOffset = header.tableOffset
        guard tableOffset % VHD.sectorSize == 0 else {
            throw CairnError(.malformedImage, "VHD BAT offset \(hex(tableOffset)) is not sector aligned", path: path,
                             offset: headerOffset + UInt64(VHD.Header.tableOffset))
        }
        guard tableOffset < fileSize, needed * 4 <= fileSize - tableOffset else {
            throw CairnError(.malformedImage, "VHD BAT at \(hex(tableOffset)) (\(needed) entries) lies past the end of the file (size \(fileSize))",
                             path: path, offset: headerOffset + UInt64(VHD.Header.tableOffset))
        }
        var bat = [UInt32](repeating: 0, count: Int(needed))
        if !bat.isEmpty {
            try bat.withUnsafeMutableBytes { try file.read(into: $0, at: tableOffset) }
            for i in bat.indices { bat[i] = UInt32(bigEndian: bat[i]) }
        }

        if type == .differencing, parent == nil {
            let recorded = header.parentName.isEmpty ? (header.parentLocatorPaths.first ?? "(no name recorded)") : header.parentName
            throw CairnError(.usage, "VHD is a differencing disk whose parent is '\(recorded)'; name the parent explicitly with --backing PATH",
                             path: path, hint: "Cairn never opens a path found inside an image")
        }
        if type == .dynamic, let parent {
            throw CairnError(.usage, "dynamic VHD has no parent, but parent image '\(parent.name)' was given", path: path, hint: "drop --backing for this image")
        }
        self.header = header
        self.parent = parent
        self.blockSize = block
        self.sectorsPerBlock = block / VHD.sectorSize
        let bitmapBytes = ((block / VHD.sectorSize + 7) / 8 + VHD.sectorSize - 1) / VHD.sectorSize * VHD.sectorSize
        self.bitmapBytes = bitmapBytes
        self.bat = bat
        self.bitmaps = Mutex(BitmapCache(capacity: Int(max(16, (16 << 20) / bitmapBytes))))
    }

    /// The footer at the end of the file; for a damaged end footer of a dynamic disk, the
    /// copy at offset 0.
    private static func readFooter(_ file: any BlockSource, fileSize: UInt64) throws -> VHDFooter {
        let endOffset = fileSize - UInt64(VHD.footerSize)
        do {
            return try VHDFooter.parse(try file.readBytes(at: endOffset, count: VHD.footerSize), path: file.name, at: endOffset, copy: "footer")
        } catch let endError {
            guard fileSize >= UInt64(VHD.footerSize) * 2,
                  let copy = try? VHDFooter.parse(try file.readBytes(at: 0, count: VHD.footerSize), path: file.name, at: 0, copy: "footer copy"),
                  copy.diskType != VHD.DiskType.fixed.rawValue else { throw endError }
            return copy
        }
    }

    // MARK: - BlockSource

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        guard buffer.count > 0 else { return }
        try walk(offset..<offset + UInt64(buffer.count)) { start, length, run in
            let from = Int(start - offset)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[from..<from + Int(length)])
            switch run {
            case .absent: try readParent(into: target, at: start)
            case .data(let host): try readHost(into: target, at: host)
            }
        }
    }

    package func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        var out: [Extent] = []
        try walk(range.lowerBound..<end) { start, length, run in
            switch run {
            case .data: out.append(Extent(offset: start, length: length, kind: .data))
            case .absent: out.append(contentsOf: try parentExtents(start, length))
            }
        }
        return out.coalesced()
    }

    // MARK: - Mapping

    enum Run: Equatable {
        /// Not in this file: the parent (differencing) or zeros.
        case absent
        /// Stored at this file offset, contiguously.
        case data(host: UInt64)
    }

    /// Calls `body` for maximal runs covering `range` (inside `0..<size`) in order.
    func walk(_ range: Range<UInt64>, _ body: (UInt64, UInt64, Run) throws -> Void) throws {
        if header == nil {
            try body(range.lowerBound, range.upperBound - range.lowerBound, .data(host: range.lowerBound))
            return
        }
        var runs = RunCoalescer<Run>()
        func emit(_ start: UInt64, _ length: UInt64, _ run: Run) throws { try runs.add(start, length, run, body) }

        var pos = range.lowerBound
        while pos < range.upperBound {
            let index = pos / blockSize
            let blockStart = index * blockSize
            let blockEnd = min(range.upperBound, blockStart + blockSize)
            let entry = bat[Int(index)]
            if entry == VHD.unusedBATEntry {
                try emit(pos, blockEnd - pos, .absent)
                pos = blockEnd
                continue
            }
            let bitmap = try sectorBitmap(block: Int(index), entry: entry)
            let dataStart = UInt64(entry) * VHD.sectorSize + bitmapBytes
            if bitmap.allSet {
                try emit(pos, blockEnd - pos, .data(host: dataStart + (pos - blockStart)))
                pos = blockEnd
                continue
            }
            while pos < blockEnd {
                let sector = (pos - blockStart) / VHD.sectorSize
                let present = bitmap.isSet(Int(sector))
                var next = sector + 1
                while next < sectorsPerBlock, blockStart + next * VHD.sectorSize < blockEnd, bitmap.isSet(Int(next)) == present { next += 1 }
                let runEnd = min(blockEnd, blockStart + next * VHD.sectorSize)
                try emit(pos, runEnd - pos, present ? .data(host: dataStart + (pos - blockStart)) : .absent)
                pos = runEnd
            }
        }
        try runs.flush(body)
    }

    /// The sector bitmap of block `block`, from the cache or the file.
    private func sectorBitmap(block: Int, entry: UInt32) throws -> SectorBitmap {
        if let hit = bitmaps.withLock({ $0.get(block) }) { return hit }
        let start = UInt64(entry) * VHD.sectorSize
        guard start < fileSize, bitmapBytes <= fileSize - start else {
            throw CairnError(.malformedImage, "VHD BAT entry \(block) points to sector \(entry) (byte \(hex(start))), past the end of the file (size \(fileSize))",
                             path: name, offset: (header?.tableOffset ?? 0) + UInt64(block) * 4)
        }
        let bytes = try file.readBytes(at: start, count: Int(bitmapBytes))
        let bitmap = SectorBitmap(bytes: bytes, sectors: Int(sectorsPerBlock))
        bitmaps.withLock { $0.put(block, bitmap) }
        return bitmap
    }

    // MARK: - Reading runs

    /// Reads file bytes; bytes past the end of the file read as zeros.
    private func readHost(into target: UnsafeMutableRawBufferPointer, at host: UInt64) throws {
        try readZeroExtended(file, into: target, at: host)
    }

    private func readParent(into target: UnsafeMutableRawBufferPointer, at guestOffset: UInt64) throws {
        try readZeroExtended(parent, into: target, at: guestOffset)
    }

    private func parentExtents(_ start: UInt64, _ length: UInt64) throws -> [Extent] {
        try lowerLayerExtents(parent, start, length)
    }
}

/// One block's sector bitmap (VHD: most significant bit first; VHDX: least); immutable once read.
final class SectorBitmap: Sendable {
    let bytes: [UInt8]
    /// Every sector of the block is present (the common case: one run per block).
    let allSet: Bool

    init(bytes: [UInt8], sectors: Int) {
        self.bytes = bytes
        var all = true
        let full = sectors / 8
        for i in 0..<min(full, bytes.count) where bytes[i] != 0xFF { all = false; break }
        if all, sectors % 8 != 0 {
            let mask = UInt8(truncatingIfNeeded: 0xFF00 >> (sectors % 8))
            all = full < bytes.count && bytes[full] & mask == mask
        }
        self.allSet = all
    }

    @inline(__always)
    func isSet(_ sector: Int) -> Bool {
        let i = sector >> 3
        guard i < bytes.count else { return false }
        return bytes[i] & (0x80 >> UInt8(sector & 7)) != 0
    }

    /// VHDX order: bit 0 of byte 0 is the first sector.
    @inline(__always)
    func isSetLSB(_ sector: Int) -> Bool {
        let i = sector >> 3
        guard i < bytes.count else { return false }
        return bytes[i] & (1 << UInt8(sector & 7)) != 0
    }
}

/// Sector bitmaps keyed by block index; dropped wholesale when full (they are cheap to reread).
struct BitmapCache {
    private var entries: [Int: SectorBitmap] = [:]
    let capacity: Int

    init(capacity: Int) { self.capacity = capacity }

    func get(_ block: Int) -> SectorBitmap? { entries[block] }

    mutating func put(_ block: Int, _ bitmap: SectorBitmap) {
        if entries.count >= capacity { entries.removeAll(keepingCapacity: true) }
        entries[block] = bitmap
    }
}

extension VHDImage.Run: MappingRun {
    func isExtended(by next: Self, afterLength length: UInt64) -> Bool {
        switch (self, next) {
        case (.absent, .absent): true
        case (.data(let a), .data(let b)): a + length == b
        default: false
        }
    }
}
