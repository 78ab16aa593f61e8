import CairnCore

/// A VMDK disk read as a virtual disk: a hosted sparse extent ("KDMV": monolithicSparse,
/// streamOptimized) or a text descriptor naming extent files (monolithicFlat,
/// twoGbMaxExtentSparse, twoGbMaxExtentFlat, vmfs and the other "-flat.vmdk" layouts).
///
/// Extent files are opened through `openExtent`, with the name exactly as the descriptor
/// writes it, and only after every extent line was checked: a name that is not a plain file
/// name ("/etc/passwd", "../x", ".", anything with "/", "\" or NUL) is refused before any
/// file is opened. The caller decides which plain names it allows.
///
/// The virtual size is the sum of the extents' sizes. Differencing (child) disks, device
/// and raw-device-mapping extents, vmfsSparse/seSparse extents and NOACCESS extents are
/// refused as unsupported (see docs/VMDK-SUPPORT.md).
///
/// Safe for concurrent `read` and `extents` calls: each sparse extent keeps its grain
/// tables in a cache behind a mutex; everything else is immutable.
package final class VMDKImage: BlockSource, Sendable {
    package let file: any BlockSource
    package let size: UInt64
    package var name: String { file.name }
    /// The descriptor's createType ("monolithicSparse", "streamOptimized", ...).
    package let createType: String
    /// The extents in guest order, for messages and tests.
    package var extentCount: Int { parts.count }

    private let parts: [Part]

    private struct Part: Sendable {
        var start: UInt64
        var length: UInt64
        var backing: Backing
        var end: UInt64 { start + length }
    }

    private enum Backing: Sendable {
        case sparse(VMDKSparseExtent)
        /// Raw bytes at `offset` in `source`.
        case flat(any BlockSource, offset: UInt64)
        case zero
    }

    package init(file: any BlockSource, openExtent: (String) throws -> any BlockSource) throws {
        let path = file.name
        let fileSize = file.size
        guard fileSize >= 4 else {
            throw CairnError(.malformedImage, "file is too small (\(fileSize) bytes) to be a VMDK image", path: path)
        }
        let head = try file.readBytes(at: 0, count: Int(min(fileSize, 64)))
        self.file = file
        if head.starts(with: VMDK.magicBytes) || head.starts(with: VMDK.cowdMagicBytes) {
            let extent = try VMDKSparseExtent(file: file)
            var createType = extent.header.isCompressed ? "streamOptimized" : "monolithicSparse"
            if let text = extent.embeddedDescriptor {
                let descriptor = try VMDKDescriptor.parse(text[...], parseExtents: false, path: path)
                if let parent = descriptor.parentDescription {
                    throw VMDKImage.childError(parent, path: path)
                }
                if let declared = descriptor.createType, !declared.isEmpty { createType = declared }
            }
            self.createType = createType
            self.size = extent.size
            self.parts = extent.size > 0 ? [Part(start: 0, length: extent.size, backing: .sparse(extent))] : []
            return
        }
        guard head.starts(with: Array(VMDK.descriptorSignature.utf8)) else {
            throw CairnError(.malformedImage, "not a VMDK image: neither a sparse extent (\"KDMV\") nor a descriptor file (\"\(VMDK.descriptorSignature)\")",
                             path: path, offset: 0)
        }
        guard fileSize <= VMDK.maxDescriptorBytes else {
            throw CairnError(.malformedImage, "VMDK descriptor file is \(fileSize) bytes; descriptors larger than 1 MiB are refused", path: path)
        }
        var text = try file.readBytes(at: 0, count: Int(fileSize))
        while text.last == 0 { text.removeLast() }
        let descriptor = try VMDKDescriptor.parse(text[...], parseExtents: true, path: path)
        if let parent = descriptor.parentDescription {
            throw VMDKImage.childError(parent, path: path)
        }
        guard let createType = descriptor.createType, !createType.isEmpty else {
            throw CairnError(.malformedImage, "VMDK descriptor has no createType", path: path)
        }
        let deviceTypes: Set<String> = ["fullDevice", "partitionedDevice", "vmfsRaw", "vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap"]
        if deviceTypes.contains(createType) {
            throw CairnError(.unsupported, "VMDK createType \"\(createType)\" maps a physical device; Cairn does not read device-backed disks", path: path,
                             hint: "back up the device itself, or convert it to a regular disk first")
        }
        guard !descriptor.extents.isEmpty else {
            throw CairnError(.malformedImage, "VMDK descriptor (createType \"\(createType)\") lists no extents", path: path)
        }

        // Check every line first, so nothing is opened for a hostile descriptor.
        var total: UInt64 = 0
        for line in descriptor.extents {
            try VMDKImage.check(line, path: path)
            let (bytes, overflow) = line.sectors.multipliedReportingOverflow(by: VMDK.sectorSize)
            guard !overflow, bytes <= VMDK.maxVirtualSize - total else {
                throw CairnError(.malformedImage, "VMDK extents add up to more than the 64 TiB limit (line \(line.lineNumber))", path: path)
            }
            total += bytes
        }

        var parts: [Part] = []
        var start: UInt64 = 0
        for line in descriptor.extents {
            let length = line.sectors * VMDK.sectorSize
            let backing: Backing
            switch line.type {
            case "ZERO":
                backing = .zero
            case "SPARSE":
                let source = try VMDKImage.open(line, openExtent, path: path)
                let extent: VMDKSparseExtent
                do {
                    extent = try VMDKSparseExtent(file: source)
                } catch var error as CairnError {
                    error.message = "extent file '\(line.fileName ?? "")' (descriptor line \(line.lineNumber)): " + error.message
                    throw error
                }
                guard extent.size >= length else {
                    throw CairnError(.malformedImage,
                                     "sparse extent '\(line.fileName ?? "")' has a capacity of \(extent.size / 512) sectors, but descriptor line \(line.lineNumber) needs \(line.sectors)",
                                     path: path)
                }
                backing = .sparse(extent)
            default:  // FLAT, VMFS (check() allowed nothing else)
                let source = try VMDKImage.open(line, openExtent, path: path)
                let offset = (line.offset ?? 0)
                guard offset <= source.size / VMDK.sectorSize, length <= source.size - offset * VMDK.sectorSize else {
                    throw CairnError(.malformedImage,
                                     "flat extent file '\(line.fileName ?? "")' is \(source.size) bytes, too short for \(line.sectors) sectors at sector offset \(offset) (descriptor line \(line.lineNumber))",
                                     path: path)
                }
                backing = .flat(source, offset: offset * VMDK.sectorSize)
            }
            parts.append(Part(start: start, length: length, backing: backing))
            start += length
        }
        self.createType = createType
        self.size = total
        self.parts = parts
    }

    private static func childError(_ parent: String, path: String) -> CairnError {
        CairnError(.unsupported, "VMDK is a differencing (child) disk of parent \(parent); Cairn reads only standalone VMDK disks", path: path,
                   hint: "consolidate the snapshot chain first (or qemu-img convert -O vmdk child.vmdk standalone.vmdk)")
    }

    /// Validates one extent line without opening anything.
    private static func check(_ line: VMDKDescriptor.ExtentLine, path: String) throws {
        guard line.sectors > 0 else {
            throw CairnError(.malformedImage, "VMDK descriptor line \(line.lineNumber): an extent of 0 sectors is invalid", path: path)
        }
        if line.access == .noAccess {
            throw CairnError(.unsupported, "VMDK descriptor line \(line.lineNumber): NOACCESS extents cannot be read", path: path)
        }
        switch line.type {
        case "ZERO":
            guard line.fileName == nil else {
                throw CairnError(.malformedImage, "VMDK descriptor line \(line.lineNumber): a ZERO extent names no file", path: path)
            }
            return
        case "SPARSE", "FLAT", "VMFS":
            break
        case "VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW":
            throw CairnError(.unsupported, "VMDK extent type \(line.type) (descriptor line \(line.lineNumber)) is not supported", path: path,
                             hint: "convert the disk first, e.g. qemu-img convert -O vmdk -o subformat=monolithicSparse")
        default:
            throw CairnError(.malformedImage, "VMDK descriptor line \(line.lineNumber): unknown extent type '\(line.type.prefix(40))'", path: path)
        }
        guard let name = line.fileName else {
            throw CairnError(.malformedImage, "VMDK descriptor line \(line.lineNumber): a \(line.type) extent needs a file name", path: path)
        }
        try VMDKDescriptor.checkPlainFileName(name, lineNumber: line.lineNumber, path: path)
        if line.type == "SPARSE", line.offset != nil {
            throw CairnError(.malformedImage, "VMDK descriptor line \(line.lineNumber): a SPARSE extent takes no offset", path: path)
        }
    }

    private static func open(_ line: VMDKDescriptor.ExtentLine, _ openExtent: (String) throws -> any BlockSource,
                             path: String) throws -> any BlockSource {
        let name = line.fileName ?? ""
        do {
            return try openExtent(name)
        } catch var error as CairnError {
            error.message = "cannot open extent file '\(name)' named on descriptor line \(line.lineNumber): " + error.message
            if error.path == nil { error.path = path }
            throw error
        } catch {
            throw CairnError(.io, "cannot open extent file '\(name)' named on descriptor line \(line.lineNumber): \(error)", path: path)
        }
    }

    // MARK: - BlockSource

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        guard buffer.count > 0 else { return }
        let end = offset + UInt64(buffer.count)
        var index = partIndex(containing: offset)
        var pos = offset
        while pos < end, index < parts.count {
            let part = parts[index]
            let stop = min(end, part.end)
            let from = Int(pos - offset)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[from..<from + Int(stop - pos)])
            switch part.backing {
            case .zero:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .sparse(let extent):
                try extent.read(into: target, at: pos - part.start)
            case .flat(let source, let base):
                try source.read(into: target, at: base + (pos - part.start))
            }
            pos = stop
            index += 1
        }
    }

    package func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        var out: [Extent] = []
        var index = partIndex(containing: range.lowerBound)
        var pos = range.lowerBound
        while pos < end, index < parts.count {
            let part = parts[index]
            let stop = min(end, part.end)
            let local = (pos - part.start)..<(stop - part.start)
            switch part.backing {
            case .zero:
                out.append(Extent(offset: pos, length: stop - pos, kind: .zero))
            case .sparse(let extent):
                for e in try extent.extents(in: local) {
                    out.append(Extent(offset: e.offset + part.start, length: e.length, kind: e.kind))
                }
            case .flat(let source, let base):
                let mapped = try source.extents(in: (base + local.lowerBound)..<(base + local.upperBound))
                var covered = pos
                for e in mapped where e.length > 0 {
                    guard e.offset >= base else { break }
                    let s = e.offset - base + part.start
                    guard s == covered, e.length <= stop - s else { break }
                    out.append(Extent(offset: s, length: e.length, kind: e.kind))
                    covered = s + e.length
                }
                // A source whose map does not cover the range exactly: the rest counts as data.
                if covered < stop { out.append(Extent(offset: covered, length: stop - covered, kind: .data)) }
            }
            pos = stop
            index += 1
        }
        return out.coalesced()
    }

    /// Index of the part holding `offset` (binary search; parts are contiguous from 0).
    private func partIndex(containing offset: UInt64) -> Int {
        var low = 0, high = parts.count
        while low < high {
            let mid = (low + high) / 2
            if parts[mid].end <= offset { low = mid + 1 } else { high = mid }
        }
        return low
    }
}
