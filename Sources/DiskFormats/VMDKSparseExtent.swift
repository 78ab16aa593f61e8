import CairnCore
import Synchronization

/// One hosted sparse extent ("KDMV"): monolithicSparse, a twoGbMaxExtentSparse piece, or a
/// streamOptimized file (compressed grains, markers, the grain directory located through
/// the footer when the header says `gdOffset = GD_AT_END`).
///
/// Mapping (Virtual Disk Format 5.0, "Grain Directory and Grain Tables"): guest grain `g`
/// is entry `g % numGTEsPerGT` of the grain table whose sector the grain directory holds at
/// index `g / numGTEsPerGT`. A grain directory entry of 0 means the whole table is
/// unallocated; a grain table entry of 0 an unallocated grain, of 1 (with the zeroed-grain
/// flag) a grain of zeros, anything else the grain's sector (of its grain marker, when the
/// grains are compressed and markers are present).
///
/// The grain directory is read and checked at open: every table must lie inside the file,
/// and no two tables (nor a table and the directory) may overlap. Grain tables are read on
/// demand into an LRU cache behind a mutex; everything else is immutable.
final class VMDKSparseExtent: Sendable {
    let file: any BlockSource
    let header: VMDKSparseHeader
    /// The embedded descriptor (text up to the first NUL), if the header points to one.
    let embeddedDescriptor: [UInt8]?
    /// Extent size in bytes.
    let size: UInt64
    var name: String { file.name }

    private let fileSize: UInt64
    private let grainBytes: UInt64
    private let grainSectors: UInt64
    private let tableEntries: UInt64
    private let directory: [UInt32]
    private let compressed: Bool
    private let markers: Bool
    private let zeroedGrains: Bool
    private let cache: Mutex<VMDKGrainTableCache>

    init(file: any BlockSource) throws {
        let path = file.name
        let fileSize = file.size
        guard fileSize >= UInt64(VMDK.headerSize) else {
            throw CairnError(.malformedImage, "VMDK sparse extent is truncated: \(fileSize) bytes, the header alone needs 512", path: path)
        }
        let raw = try file.readBytes(at: 0, count: VMDK.headerSize)
        if raw.starts(with: VMDK.cowdMagicBytes) {
            throw CairnError(.unsupported, "VMDK3 / ESX vmfsSparse (\"COWD\") extents are not supported", path: path,
                             hint: "convert the disk first, e.g. qemu-img convert -O vmdk -o subformat=monolithicSparse")
        }
        guard var header = VMDKSparseHeader.decode(raw) else {
            throw CairnError(.malformedImage, "not a VMDK sparse extent: the file does not start with \"KDMV\"", path: path, offset: 0)
        }

        if header.gdOffset == VMDK.gdAtEnd {
            header = try VMDKSparseExtent.readFooter(file: file, fileSize: fileSize)
        }
        try VMDKSparseExtent.validate(header, fileSize: fileSize, path: path)

        self.file = file
        self.header = header
        self.fileSize = fileSize
        self.size = header.capacity * VMDK.sectorSize
        self.grainSectors = header.grainSize
        self.grainBytes = header.grainSize * VMDK.sectorSize
        self.tableEntries = UInt64(header.numGTEsPerGT)
        self.compressed = header.isCompressed
        self.markers = header.hasMarkers
        self.zeroedGrains = header.hasZeroedGrainEntries

        // Grain directory: validate() showed it lies inside the file.
        let grainsPerTable = UInt64(header.numGTEsPerGT) * header.grainSize
        let entries = Int((header.capacity + grainsPerTable - 1) / grainsPerTable)
        var directory = [UInt32](repeating: 0, count: entries)
        if entries > 0 {
            try directory.withUnsafeMutableBytes { try file.read(into: $0, at: header.gdOffset * VMDK.sectorSize) }
            for i in directory.indices { directory[i] = UInt32(littleEndian: directory[i]) }
        }
        try VMDKSparseExtent.checkTables(directory, header: header, fileSize: fileSize, path: path)
        self.directory = directory

        // Embedded descriptor, if any (bounded and inside the file).
        var embedded: [UInt8]?
        if header.descriptorOffset > 0, header.descriptorSize > 0 {
            let start = header.descriptorOffset
            let sectors = min(header.descriptorSize, VMDK.maxDescriptorBytes / VMDK.sectorSize)
            guard start <= fileSize / VMDK.sectorSize, sectors <= fileSize / VMDK.sectorSize - start else {
                throw CairnError(.malformedImage,
                                 "VMDK embedded descriptor (sector \(start), \(header.descriptorSize) sectors) lies past the end of the file (size \(fileSize))",
                                 path: path, offset: UInt64(VMDK.Field.descriptorOffset))
            }
            let bytes = try file.readBytes(at: start * VMDK.sectorSize, count: Int(sectors * VMDK.sectorSize))
            embedded = Array(bytes.prefix { $0 != 0 })
        }
        self.embeddedDescriptor = embedded

        // 512 tables of 512 entries (2 KiB each) map 16 GiB with 64 KiB grains.
        self.cache = Mutex(VMDKGrainTableCache(capacity: 512))
    }

    /// The stream-optimized footer: footer marker, header copy, end-of-stream marker in the
    /// last three sectors of the file.
    private static func readFooter(file: any BlockSource, fileSize: UInt64) throws -> VMDKSparseHeader {
        let path = file.name
        let end = fileSize / VMDK.sectorSize * VMDK.sectorSize
        guard end >= 4 * VMDK.sectorSize else {
            throw CairnError(.malformedImage, "stream-optimized VMDK has gdOffset GD_AT_END but is too short (\(fileSize) bytes) to hold a footer",
                             path: path)
        }
        let start = end - 3 * VMDK.sectorSize
        let bytes = try file.readBytes(at: start, count: 3 * Int(VMDK.sectorSize))
        let footerMarker = VMDKMarker.decode(bytes, at: 0)
        let eos = VMDKMarker.decode(bytes, at: 1024)
        guard let footerMarker, footerMarker.size == 0, footerMarker.type == VMDK.Marker.footer,
              let eos, eos.value == 0, eos.size == 0, eos.type == VMDK.Marker.endOfStream else {
            throw CairnError(.malformedImage,
                             "stream-optimized VMDK has gdOffset GD_AT_END but no valid footer marker / end-of-stream marker in its last three sectors",
                             path: path, offset: start)
        }
        guard let footer = VMDKSparseHeader.decode(Array(bytes[512..<1024])) else {
            throw CairnError(.malformedImage, "stream-optimized VMDK footer does not start with \"KDMV\"", path: path, offset: start + 512)
        }
        guard footer.gdOffset != VMDK.gdAtEnd else {
            throw CairnError(.malformedImage, "stream-optimized VMDK footer has gdOffset GD_AT_END too", path: path, offset: start + 512)
        }
        return footer
    }

    private static func validate(_ h: VMDKSparseHeader, fileSize: UInt64, path: String) throws {
        func malformed(_ message: String, _ field: Int) -> CairnError {
            CairnError(.malformedImage, message, path: path, offset: UInt64(field))
        }
        guard h.version >= 1 else { throw malformed("VMDK sparse extent version 0 is invalid", VMDK.Field.version) }
        guard h.version <= VMDK.maxVersion else {
            throw CairnError(.unsupported, "VMDK sparse extent version \(h.version) is not supported (1 to 3 are)", path: path,
                             offset: UInt64(VMDK.Field.version))
        }
        guard h.compressAlgorithm == VMDK.compressionNone || h.compressAlgorithm == VMDK.compressionDeflate else {
            throw CairnError(.unsupported, "VMDK compression algorithm \(h.compressAlgorithm) is not supported (only 1, deflate)", path: path,
                             offset: UInt64(VMDK.Field.compressAlgorithm))
        }
        guard h.grainSize >= 1, h.grainSize <= VMDK.maxGrainSectors, h.grainSize & (h.grainSize - 1) == 0 else {
            throw malformed("VMDK grain size \(h.grainSize) sectors is not a power of two from 1 to \(VMDK.maxGrainSectors)", VMDK.Field.grainSize)
        }
        guard h.numGTEsPerGT >= 1, h.numGTEsPerGT <= VMDK.maxGTEsPerGT else {
            throw malformed("VMDK grain tables of \(h.numGTEsPerGT) entries are invalid (1 to \(VMDK.maxGTEsPerGT))", VMDK.Field.numGTEsPerGT)
        }
        guard h.capacity <= VMDK.maxVirtualSize / VMDK.sectorSize else {
            throw malformed("VMDK capacity of \(h.capacity) sectors exceeds the 64 TiB limit", VMDK.Field.capacity)
        }
        let grainsPerTable = UInt64(h.numGTEsPerGT) * h.grainSize
        let entries = (h.capacity + grainsPerTable - 1) / grainsPerTable
        guard entries <= VMDK.maxGrainDirectoryEntries else {
            throw malformed("VMDK capacity of \(h.capacity) sectors needs \(entries) grain directory entries (at most \(VMDK.maxGrainDirectoryEntries))",
                            VMDK.Field.capacity)
        }
        let fileSectors = fileSize / VMDK.sectorSize
        guard h.overHead <= fileSectors else {
            throw malformed("VMDK file is truncated: overHead is \(h.overHead) sectors but the file has \(fileSize) bytes", VMDK.Field.overHead)
        }
        if entries > 0 {
            guard h.gdOffset >= 1, h.gdOffset <= fileSectors, entries * 4 <= fileSize - h.gdOffset * VMDK.sectorSize else {
                throw malformed("VMDK grain directory (sector \(h.gdOffset), \(entries) entries) lies past the end of the file (size \(fileSize))",
                                VMDK.Field.gdOffset)
            }
        }
    }

    /// Every grain table inside the file, outside the header and the directory, and no two
    /// tables overlapping (which would map two guest ranges to the same grains).
    private static func checkTables(_ directory: [UInt32], header h: VMDKSparseHeader, fileSize: UInt64, path: String) throws {
        guard !directory.isEmpty else { return }
        let tableBytes = UInt64(h.numGTEsPerGT) * 4
        // Header fields are untrusted: every product is checked (found by fuzzing: a huge
        // gdOffset overflowed here).
        let (gdStart, overflow) = h.gdOffset.multipliedReportingOverflow(by: VMDK.sectorSize)
        let (gdEnd, overflow2) = gdStart.addingReportingOverflow(UInt64(directory.count) * 4)
        guard !overflow, !overflow2, gdEnd <= fileSize else {
            throw CairnError(.malformedImage, "VMDK grain directory at sector \(h.gdOffset) lies past the end of the file (size \(fileSize))",
                             path: path, offset: UInt64(VMDK.Field.gdOffset))
        }
        var tables: [(start: UInt64, index: Int)] = []
        for (index, entry) in directory.enumerated() where entry != 0 {
            let start = UInt64(entry) * VMDK.sectorSize
            let where_ = gdStart + UInt64(index) * 4
            guard start <= fileSize, tableBytes <= fileSize - start else {
                throw CairnError(.malformedImage,
                                 "VMDK grain directory entry \(index) points to a grain table at sector \(entry), past the end of the file (size \(fileSize))",
                                 path: path, offset: where_)
            }
            guard start + tableBytes <= gdStart || start >= gdEnd else {
                throw CairnError(.malformedImage, "VMDK grain directory entry \(index) points to a grain table (sector \(entry)) inside the grain directory itself",
                                 path: path, offset: where_)
            }
            tables.append((start, index))
        }
        tables.sort { $0.start < $1.start }
        for i in tables.indices.dropFirst() where tables[i].start - tables[i - 1].start < tableBytes {
            throw CairnError(.malformedImage,
                             "VMDK grain tables of grain directory entries \(tables[i - 1].index) and \(tables[i].index) overlap (sectors \(tables[i - 1].start / 512) and \(tables[i].start / 512))",
                             path: path, offset: gdStart + UInt64(tables[i].index) * 4)
        }
    }

    // MARK: - Mapping

    enum Run {
        case unallocated
        case zero
        /// Uncompressed data at this file offset (of the run's first byte), contiguously.
        case data(host: UInt64)
        /// Inside one compressed grain (`grain` is the guest grain index); `inGrain` is the
        /// run's offset in the grain.
        case compressed(host: UInt64, grain: UInt64, inGrain: Int)
    }

    /// Calls `body` for maximal runs covering `range` (inside `0..<size`) in order.
    func walk(_ range: Range<UInt64>, _ body: (UInt64, UInt64, Run) throws -> Void) throws {
        var runs = RunCoalescer<Run>()
        func emit(_ start: UInt64, _ length: UInt64, _ run: Run) throws { try runs.add(start, length, run, body) }

        let tableSpan = grainBytes * tableEntries
        var pos = range.lowerBound
        let end = range.upperBound
        while pos < end {
            let tableIndex = pos / tableSpan
            guard tableIndex < UInt64(directory.count) else {
                throw CairnError(.malformedImage, "VMDK grain directory (\(directory.count) entries) does not cover guest offset \(hex(pos))", path: name)
            }
            let spanEnd = min(end, (tableIndex + 1) * tableSpan)
            let tableSector = directory[Int(tableIndex)]
            if tableSector == 0 {
                try emit(pos, spanEnd - pos, .unallocated)
                pos = spanEnd
                continue
            }
            let table = try grainTable(atSector: tableSector)
            while pos < spanEnd {
                let grain = pos / grainBytes
                let grainEnd = min(spanEnd, (grain + 1) * grainBytes)
                let inGrain = pos - grain * grainBytes
                let entry = table.entries[Int(grain % tableEntries)]
                if entry == 0 {
                    try emit(pos, grainEnd - pos, .unallocated)
                } else if entry == VMDK.zeroedGrainEntry && zeroedGrains {
                    try emit(pos, grainEnd - pos, .zero)
                } else {
                    let host = UInt64(entry) * VMDK.sectorSize
                    guard host < fileSize else {
                        throw CairnError(.malformedImage,
                                         "VMDK grain table entry for guest offset \(hex(grain * grainBytes)) points to sector \(entry), past the end of the file (size \(fileSize))",
                                         path: name)
                    }
                    if compressed {
                        try emit(pos, grainEnd - pos, .compressed(host: host, grain: grain, inGrain: Int(inGrain)))
                    } else {
                        try emit(pos, grainEnd - pos, .data(host: host + inGrain))
                    }
                }
                pos = grainEnd
            }
        }
        try runs.flush(body)
    }

    private func grainTable(atSector sector: UInt32) throws -> VMDKGrainTable {
        if let cached = cache.withLock({ $0.get(sector) }) { return cached }
        // checkTables() showed the table lies inside the file.
        var entries = [UInt32](repeating: 0, count: Int(tableEntries))
        try entries.withUnsafeMutableBytes { try file.read(into: $0, at: UInt64(sector) * VMDK.sectorSize) }
        for i in entries.indices { entries[i] = UInt32(littleEndian: entries[i]) }
        let table = VMDKGrainTable(entries: entries)
        cache.withLock { $0.put(sector, table) }
        return table
    }

    // MARK: - BlockSource-like access (offsets inside the extent)

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard buffer.count > 0 else { return }
        var scratch: [UInt8] = []
        try walk(offset..<offset + UInt64(buffer.count)) { start, length, run in
            let from = Int(start - offset)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[from..<from + Int(length)])
            switch run {
            case .zero, .unallocated:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .data(let host):
                try readHost(into: target, at: host)
            case .compressed(let host, let grain, let inGrain):
                try readCompressed(host: host, grain: grain, inGrain: inGrain, into: target, scratch: &scratch)
            }
        }
    }

    func extents(in range: Range<UInt64>) throws -> [Extent] {
        var out: [Extent] = []
        try walk(range) { start, length, run in
            switch run {
            case .data, .compressed: out.append(Extent(offset: start, length: length, kind: .data))
            case .zero: out.append(Extent(offset: start, length: length, kind: .zero))
            case .unallocated: out.append(Extent(offset: start, length: length, kind: .unallocated))
            }
        }
        return out.coalesced()
    }

    /// Bytes of an uncompressed grain past the end of the file read as zeros (as in QEMU).
    private func readHost(into target: UnsafeMutableRawBufferPointer, at host: UInt64) throws {
        let available = host < fileSize ? Int(min(UInt64(target.count), fileSize - host)) : 0
        if available > 0 {
            try file.read(into: UnsafeMutableRawBufferPointer(rebasing: target[0..<available]), at: host)
        }
        if available < target.count {
            UnsafeMutableRawBufferPointer(rebasing: target[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    private func readCompressed(host: UInt64, grain: UInt64, inGrain: Int, into target: UnsafeMutableRawBufferPointer,
                                scratch: inout [UInt8]) throws {
        let grainStart = grain * grainBytes
        func bad(_ why: String) -> CairnError {
            CairnError(.malformedImage, "VMDK compressed grain for guest offset \(hex(grainStart)) at \(hex(host)) \(why)", path: name, offset: host)
        }
        let maxCompressed = UInt64(VMDKZlib.bound(Int(grainBytes))) + VMDK.sectorSize
        var dataOffset = host
        var dataLength: UInt64
        if markers {
            guard UInt64(VMDK.grainMarkerHeaderSize) <= fileSize - host else { throw bad("has its grain marker cut off by the end of the file") }
            let marker = CheckedBytes(try file.readBytes(at: host, count: VMDK.grainMarkerHeaderSize))
            let lba = marker.u64(at: 0) ?? 0
            dataLength = UInt64(marker.u32(at: 8) ?? 0)
            guard lba == grain * grainSectors else { throw bad("has a grain marker for sector \(lba), expected \(grain * grainSectors)") }
            guard dataLength > 0, dataLength <= maxCompressed else { throw bad("has an invalid compressed length \(dataLength)") }
            dataOffset = host + UInt64(VMDK.grainMarkerHeaderSize)
            guard dataLength <= fileSize - dataOffset else { throw bad("(\(dataLength) bytes) extends past the end of the file (size \(fileSize))") }
        } else {
            dataLength = min(maxCompressed, fileSize - host)
        }
        // Bytes of the grain inside the extent: the last grain may be shorter.
        let valid = Int(min(grainBytes, size - grainStart))
        let inputCount = Int(dataLength)
        let needed = inputCount + Int(grainBytes)
        if scratch.count < needed { scratch = [UInt8](repeating: 0, count: needed) }
        let produced = try scratch.withUnsafeMutableBytes { space -> Int? in
            let input = UnsafeMutableRawBufferPointer(rebasing: space[0..<inputCount])
            try file.read(into: input, at: dataOffset)
            let whole = UnsafeMutableRawBufferPointer(rebasing: space[inputCount..<needed])
            guard let n = VMDKZlib.inflateStream(UnsafeRawBufferPointer(input), into: whole) else { return nil }
            guard n == Int(grainBytes) || n == valid else { return nil }
            if n < inGrain + target.count {
                UnsafeMutableRawBufferPointer(rebasing: whole[n...]).initializeMemory(as: UInt8.self, repeating: 0)
            }
            target.copyMemory(from: UnsafeRawBufferPointer(rebasing: whole[inGrain..<inGrain + target.count]))
            return n
        }
        guard produced != nil else {
            throw bad("(\(dataLength) bytes) does not inflate (zlib) to one \(grainBytes)-byte grain")
        }
    }
}

/// One grain table in host byte order; immutable once read.
final class VMDKGrainTable: Sendable {
    let entries: [UInt32]
    init(entries: [UInt32]) { self.entries = entries }
}

/// Grain tables by their sector.
typealias VMDKGrainTableCache = LRUCache<UInt32, VMDKGrainTable>

extension VMDKSparseExtent.Run: MappingRun {
    func isExtended(by next: Self, afterLength length: UInt64) -> Bool {
        switch (self, next) {
        case (.unallocated, .unallocated), (.zero, .zero): true
        case (.data(let a), .data(let b)): a + length == b
        default: false   // compressed runs never merge
        }
    }
}
