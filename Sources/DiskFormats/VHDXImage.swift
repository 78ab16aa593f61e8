import CairnCore
import Synchronization

/// A VHDX image ([MS-VHDX]) read as a virtual disk: fixed, dynamic or differencing.
///
/// Opening checks the file type identifier, picks the current header (valid CRC-32C, higher
/// sequence number), reads the region table (the first copy, or the second if the first is
/// damaged), the metadata items and the BAT. Payload block states map as:
///
/// | BAT state | read | extent |
/// |---|---|---|
/// | FULLY_PRESENT | the block in the file | data |
/// | PARTIALLY_PRESENT (differencing) | per sector bitmap: file or parent | data / parent's |
/// | NOT_PRESENT | the parent, or zeros | parent's / unallocated |
/// | ZERO, UNMAPPED, UNDEFINED | zeros | zero |
///
/// A non-empty log (log GUID set and a "loge" entry of that GUID in the log region) means the
/// image was not closed cleanly and the BAT or metadata may be stale: it is refused with
/// `.unsupported`, never ignored. Safe for concurrent reads: the only mutable state is a
/// cache of sector bitmaps behind a mutex.
package final class VHDXImage: BlockSource, Sendable {
    package let file: any BlockSource
    package let parent: (any BlockSource)?
    package let size: UInt64
    package var name: String { file.name }
    package let blockSize: UInt64
    package let logicalSectorSize: UInt64
    package let physicalSectorSize: UInt64
    package let isDifferencing: Bool
    /// The parent path recorded in a differencing image (relative_path, else absolute_win32_path).
    package let parentPath: String?
    /// The sequence number of the header in use.
    package let headerSequenceNumber: UInt64

    private let fileSize: UInt64
    private let chunkRatio: UInt64
    private let bat: [UInt64]
    private let batOffset: UInt64
    private let bitmaps: Mutex<BitmapCache>

    /// Opens `file` as VHDX.
    ///
    /// - Parameter parent: the image the user named as the parent of a differencing VHDX. We
    ///   never open a path recorded in the image.
    package init(file: any BlockSource, parent: (any BlockSource)? = nil) throws {
        let path = file.name
        let fileSize = file.size
        guard fileSize >= 1 << 20 else {
            throw CairnError(.malformedImage, "file of \(fileSize) bytes is too small for a VHDX (at least 1 MiB of headers)", path: path)
        }
        guard try file.readBytes(at: 0, count: 8) == VHDX.fileSignature else {
            throw CairnError(.malformedImage, "VHDX file type identifier is not \"vhdxfile\"", path: path, offset: 0)
        }

        // The current header: valid, and the higher sequence number.
        let h1 = VHDXHeader.parse(try file.readBytes(at: VHDX.header1Offset, count: VHDX.headerSize))
        let h2 = VHDXHeader.parse(try file.readBytes(at: VHDX.header2Offset, count: VHDX.headerSize))
        let header: VHDXHeader
        switch (h1, h2) {
        case (.success(let a), .success(let b)): header = b.sequenceNumber > a.sequenceNumber ? b : a
        case (.success(let a), .failure): header = a
        case (.failure, .success(let b)): header = b
        case (.failure(let e1), .failure(let e2)):
            throw CairnError(.malformedImage, "VHDX has no valid header: header 1: \(e1); header 2: \(e2)", path: path, offset: VHDX.header1Offset,
                             hint: "the image is damaged beyond what Cairn reads")
        }
        self.headerSequenceNumber = header.sequenceNumber
        try Self.checkLog(header, file: file, fileSize: fileSize)

        // Region table: first copy, else the second.
        let regions: [VHDXRegion]
        switch VHDXRegion.parseTable(try file.readBytes(at: VHDX.regionTable1Offset, count: VHDX.regionTableSize)) {
        case .success(let r): regions = r
        case .failure(let e1):
            switch VHDXRegion.parseTable(try file.readBytes(at: VHDX.regionTable2Offset, count: VHDX.regionTableSize)) {
            case .success(let r): regions = r
            case .failure(let e2):
                throw CairnError(.malformedImage, "VHDX has no valid region table: region table 1: \(e1); region table 2: \(e2)",
                                 path: path, offset: VHDX.regionTable1Offset)
            }
        }
        var batRegion: VHDXRegion?, metadataRegion: VHDXRegion?
        for r in regions {
            if r.guid == VHDX.batRegion || r.guid == VHDX.metadataRegion {
                guard r.fileOffset >= VHDX.miB, r.fileOffset % VHDX.miB == 0 else {
                    throw CairnError(.malformedImage, "VHDX region \(r.guid) offset \(hex(r.fileOffset)) is not a 1 MiB multiple past the headers",
                                     path: path, offset: VHDX.regionTable1Offset)
                }
                guard r.fileOffset < fileSize, UInt64(r.length) <= fileSize - r.fileOffset else {
                    throw CairnError(.malformedImage, "VHDX region \(r.guid) at \(hex(r.fileOffset)) (\(r.length) bytes) lies past the end of the file (size \(fileSize))",
                                     path: path, offset: VHDX.regionTable1Offset)
                }
                if r.guid == VHDX.batRegion {
                    guard batRegion == nil else { throw CairnError(.malformedImage, "VHDX region table lists the BAT twice", path: path) }
                    batRegion = r
                } else {
                    guard metadataRegion == nil else { throw CairnError(.malformedImage, "VHDX region table lists the metadata region twice", path: path) }
                    metadataRegion = r
                }
            } else if r.required {
                throw CairnError(.unsupported, "VHDX region \(r.guid) is marked required but unknown to Cairn", path: path, offset: VHDX.regionTable1Offset)
            }
        }
        guard let batRegion, let metadataRegion else {
            throw CairnError(.malformedImage, "VHDX region table lacks the \(batRegion == nil ? "BAT" : "metadata") region", path: path, offset: VHDX.regionTable1Offset)
        }

        let meta = try VHDXMetadata.read(from: file, regionOffset: metadataRegion.fileOffset, regionLength: UInt64(metadataRegion.length))
        let block = UInt64(meta.blockSize)
        let chunkRatio = VHDX.sectorsPerBitmapBlock * UInt64(meta.logicalSectorSize) / block
        let payloadBlocks = (meta.virtualDiskSize + block - 1) / block
        let entries: UInt64
        if meta.hasParent {
            entries = (payloadBlocks + chunkRatio - 1) / chunkRatio * (chunkRatio + 1)
        } else {
            entries = payloadBlocks == 0 ? 0 : payloadBlocks + (payloadBlocks - 1) / chunkRatio
        }
        guard entries * 8 <= UInt64(batRegion.length) else {
            throw CairnError(.malformedImage, "VHDX BAT region (\(batRegion.length) bytes) is too small for \(entries) entries (virtual size \(meta.virtualDiskSize), block size \(block))",
                             path: path, offset: batRegion.fileOffset)
        }
        var bat = [UInt64](repeating: 0, count: Int(entries))
        if !bat.isEmpty {
            try bat.withUnsafeMutableBytes { try file.read(into: $0, at: batRegion.fileOffset) }
            for i in bat.indices { bat[i] = UInt64(littleEndian: bat[i]) }
        }

        if meta.hasParent, parent == nil {
            throw CairnError(.usage, "VHDX is a differencing disk whose parent is '\(meta.parentPath ?? "(no path recorded)")'; name the parent explicitly with --backing PATH",
                             path: path, hint: "Cairn never opens a path found inside an image")
        }
        if !meta.hasParent, let parent {
            throw CairnError(.usage, "VHDX has no parent, but parent image '\(parent.name)' was given", path: path, hint: "drop --backing for this image")
        }
        self.file = file
        self.parent = parent
        self.fileSize = fileSize
        self.size = meta.virtualDiskSize
        self.blockSize = block
        self.logicalSectorSize = UInt64(meta.logicalSectorSize)
        self.physicalSectorSize = UInt64(meta.physicalSectorSize)
        self.isDifferencing = meta.hasParent
        self.parentPath = meta.hasParent ? meta.parentPath : nil
        self.chunkRatio = chunkRatio
        self.bat = bat
        self.batOffset = batRegion.fileOffset
        let bitmapBytes = max(1, block / UInt64(meta.logicalSectorSize) / 8)
        self.bitmaps = Mutex(BitmapCache(capacity: Int(max(16, (16 << 20) / bitmapBytes))))
    }

    /// Refuses an image whose log holds entries (not closed cleanly).
    private static func checkLog(_ header: VHDXHeader, file: any BlockSource, fileSize: UInt64) throws {
        guard !header.logGUID.isZero else { return }
        let offset = header.logOffset, length = UInt64(header.logLength)
        guard offset >= VHDX.miB, offset % VHDX.miB == 0, length % VHDX.miB == 0, offset < fileSize, length <= fileSize - offset else {
            throw CairnError(.malformedImage, "VHDX log at \(hex(offset)) (\(length) bytes) is not a valid region of the file", path: file.name,
                             offset: VHDX.header1Offset + UInt64(VHDX.Header.logOffset))
        }
        var pos = offset
        while pos < offset + length {
            let head = CheckedBytes(try file.readBytes(at: pos, count: 48))
            if head.u32(at: 0) == VHDX.logEntrySignature, head.guid(at: 32) == header.logGUID {
                throw CairnError(.unsupported, "VHDX log is not empty (the image was not closed cleanly)", path: file.name, offset: pos,
                                 hint: "open and close it once in Hyper-V or run qemu-img check -r all")
            }
            pos += 4096
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
            case .zero: target.initializeMemory(as: UInt8.self, repeating: 0)
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
            case .zero: out.append(Extent(offset: start, length: length, kind: .zero))
            case .absent: out.append(contentsOf: try parentExtents(start, length))
            }
        }
        return out.coalesced()
    }

    // MARK: - Mapping

    enum Run: Equatable {
        /// Not in this file: the parent, or zeros (.unallocated) without one.
        case absent
        /// Reads as zeros (ZERO, UNMAPPED, UNDEFINED blocks).
        case zero
        /// Stored at this file offset, contiguously.
        case data(host: UInt64)
    }

    /// Calls `body` for maximal runs covering `range` (inside `0..<size`) in order.
    func walk(_ range: Range<UInt64>, _ body: (UInt64, UInt64, Run) throws -> Void) throws {
        var runs = RunCoalescer<Run>()
        func emit(_ start: UInt64, _ length: UInt64, _ run: Run) throws { try runs.add(start, length, run, body) }

        var pos = range.lowerBound
        while pos < range.upperBound {
            let index = pos / blockSize
            let blockStart = index * blockSize
            let blockEnd = min(range.upperBound, blockStart + blockSize)
            let batIndex = Int(index + index / chunkRatio)
            let entry = bat[batIndex]
            let fileOffset = entry & VHDX.batOffsetMask
            switch VHDX.PayloadState(rawValue: entry & VHDX.batStateMask) {
            case .notPresent:
                try emit(pos, blockEnd - pos, .absent)
            case .undefined, .zero, .unmapped:
                try emit(pos, blockEnd - pos, .zero)
            case .fullyPresent:
                try checkBlockOffset(fileOffset, batIndex: batIndex, what: "payload block \(index)")
                try emit(pos, blockEnd - pos, .data(host: fileOffset + (pos - blockStart)))
            case .partiallyPresent:
                guard isDifferencing else {
                    throw CairnError(.malformedImage, "VHDX BAT entry \(batIndex) marks payload block \(index) partially present, but the image has no parent",
                                     path: name, offset: batOffset + UInt64(batIndex) * 8)
                }
                try checkBlockOffset(fileOffset, batIndex: batIndex, what: "payload block \(index)")
                let bitmap = try sectorBitmap(block: index)
                let sector = logicalSectorSize
                let sectors = blockSize / sector
                while pos < blockEnd {
                    let s = (pos - blockStart) / sector
                    let present = bitmap.isSetLSB(Int(s))
                    var next = s + 1
                    while next < sectors, blockStart + next * sector < blockEnd, bitmap.isSetLSB(Int(next)) == present { next += 1 }
                    let runEnd = min(blockEnd, blockStart + next * sector)
                    try emit(pos, runEnd - pos, present ? .data(host: fileOffset + (pos - blockStart)) : .absent)
                    pos = runEnd
                }
            case nil:
                throw CairnError(.malformedImage, "VHDX BAT entry \(batIndex) for payload block \(index) has the undefined state \(entry & VHDX.batStateMask)",
                                 path: name, offset: batOffset + UInt64(batIndex) * 8)
            }
            pos = blockEnd
        }
        try runs.flush(body)
    }

    private func checkBlockOffset(_ offset: UInt64, batIndex: Int, what: String) throws {
        guard offset >= VHDX.miB, offset < fileSize else {
            throw CairnError(.malformedImage, "VHDX BAT entry \(batIndex) places \(what) at \(hex(offset)), \(offset < VHDX.miB ? "inside the headers" : "past the end of the file (size \(fileSize))")",
                             path: name, offset: batOffset + UInt64(batIndex) * 8)
        }
    }

    /// The part of its chunk's sector bitmap block that covers payload block `block`.
    private func sectorBitmap(block: UInt64) throws -> SectorBitmap {
        if let hit = bitmaps.withLock({ $0.get(Int(block)) }) { return hit }
        let chunk = block / chunkRatio
        let sbIndex = Int(chunk * (chunkRatio + 1) + chunkRatio)
        guard sbIndex < bat.count else {
            throw CairnError(.malformedImage, "VHDX BAT has no sector bitmap entry for payload block \(block)", path: name, offset: batOffset)
        }
        let entry = bat[sbIndex]
        guard entry & VHDX.batStateMask == VHDX.sectorBitmapPresent else {
            throw CairnError(.malformedImage, "VHDX payload block \(block) is partially present but its sector bitmap block (BAT entry \(sbIndex)) is not present",
                             path: name, offset: batOffset + UInt64(sbIndex) * 8)
        }
        let sbOffset = entry & VHDX.batOffsetMask
        guard sbOffset >= VHDX.miB, sbOffset < fileSize, VHDX.miB <= fileSize - sbOffset else {
            throw CairnError(.malformedImage, "VHDX BAT entry \(sbIndex) places a sector bitmap block at \(hex(sbOffset)), outside the file (size \(fileSize))",
                             path: name, offset: batOffset + UInt64(sbIndex) * 8)
        }
        let sectors = blockSize / logicalSectorSize
        let bytesPerBlock = sectors / 8
        let bytes = try file.readBytes(at: sbOffset + (block % chunkRatio) * bytesPerBlock, count: Int(bytesPerBlock))
        let bitmap = SectorBitmap(bytes: bytes, sectors: Int(sectors))
        bitmaps.withLock { $0.put(Int(block), bitmap) }
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

extension VHDXImage.Run: MappingRun {
    func isExtended(by next: Self, afterLength length: UInt64) -> Bool {
        switch (self, next) {
        case (.absent, .absent), (.zero, .zero): true
        case (.data(let a), .data(let b)): a + length == b
        default: false
        }
    }
}
