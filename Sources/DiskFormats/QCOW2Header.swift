import CairnCore

/// The qcow2 image header (QEMU `docs/interop/qcow2.rst`, "Header"), versions 2 and 3.
///
///     Byte  0 -  3   magic "QFI\xfb"
///           4 -  7   version (2 or 3)
///           8 - 15   backing_file_offset        16 - 19  backing_file_size (<= 1023)
///          20 - 23   cluster_bits (9...21)      24 - 31  size (virtual, bytes)
///          32 - 35   crypt_method (0 = none)    36 - 39  l1_size (entries)
///          40 - 47   l1_table_offset            48 - 55  refcount_table_offset
///          56 - 59   refcount_table_clusters    60 - 63  nb_snapshots
///          64 - 71   snapshots_offset           -- end of a version 2 header (72 bytes)
///          72 - 79   incompatible_features      80 - 87  compatible_features
///          88 - 95   autoclear_features         96 - 99  refcount_order
///         100 - 103  header_length (>= 104, multiple of 8)
///         104        compression_type (0 deflate, 1 zstd), present if header_length > 104
///
/// Header extensions follow `header_length` inside the first cluster; we read the backing
/// format name (0xe2792aca) and the feature name table (0x6803f857, for messages).
///
/// Parsing validates every field before anything else uses it: a header that passes
/// `init(parsing:fileSize:name:)` has a cluster size in range, an L1 table that covers the
/// virtual size and lies inside the file, and no feature we cannot read.
package struct QCOW2Header: Sendable, Equatable {
    package enum CompressionType: UInt8, Sendable {
        /// Raw deflate (QEMU calls it "zlib"), no zlib header.
        case deflate = 0
        case zstd = 1
    }

    package var version: UInt32
    package var backingFileOffset: UInt64
    package var backingFileSize: UInt32
    package var clusterBits: UInt32
    /// Virtual disk size in bytes.
    package var size: UInt64
    package var cryptMethod: UInt32
    package var l1Size: UInt32
    package var l1TableOffset: UInt64
    package var refcountTableOffset: UInt64
    package var refcountTableClusters: UInt32
    package var nbSnapshots: UInt32
    package var snapshotsOffset: UInt64
    package var incompatibleFeatures: UInt64
    package var compatibleFeatures: UInt64
    package var autoclearFeatures: UInt64
    package var refcountOrder: UInt32
    package var headerLength: UInt32
    package var compressionType: CompressionType
    /// The backing file name recorded in the image (never opened by us), nil if none.
    package var backingFileName: String?
    /// The backing file format from the header extension, if present ("qcow2", "raw").
    package var backingFormat: String?

    package var clusterSize: Int { 1 << Int(clusterBits) }
    /// Entries per L2 table (8 bytes each, one cluster per table).
    package var l2Entries: Int { clusterSize / 8 }
    /// The image was not closed cleanly (refcounts may be stale; reading is fine).
    package var isDirty: Bool { incompatibleFeatures & QCOW2.Incompatible.dirty != 0 }
    /// QEMU marked the image corrupt; we still read it, read-only.
    package var isMarkedCorrupt: Bool { incompatibleFeatures & QCOW2.Incompatible.corrupt != 0 }

    /// Reads and validates the header of `source` (the first cluster at most).
    package static func read(from source: any BlockSource) throws -> QCOW2Header {
        let fileSize = source.size
        let probe = Int(min(fileSize, UInt64(QCOW2.v3WrittenHeaderLength)))
        let head = try source.readBytes(at: 0, count: probe)
        guard head.count >= QCOW2.v2HeaderLength else {
            // Let the parser produce the precise message.
            return try QCOW2Header(parsing: head, fileSize: fileSize, name: source.name)
        }
        let bits = CheckedBytes(head, order: .big).u32(at: QCOW2.Field.clusterBits) ?? 0
        guard bits >= QCOW2.minClusterBits, bits <= QCOW2.maxClusterBits else {
            return try QCOW2Header(parsing: head, fileSize: fileSize, name: source.name)
        }
        let firstCluster = Int(min(fileSize, UInt64(1) << UInt64(bits)))
        let bytes = firstCluster > head.count ? try source.readBytes(at: 0, count: firstCluster) : head
        return try QCOW2Header(parsing: bytes, fileSize: fileSize, name: source.name)
    }

    /// Parses the header from the first bytes of an image (ideally its whole first cluster,
    /// where extensions and the backing file name live). `fileSize` bounds every offset.
    package init(parsing bytes: [UInt8], fileSize: UInt64, name: String) throws {
        let b = CheckedBytes(bytes, order: .big)
        func fail(_ message: String, at offset: Int? = nil, hint: String? = nil) -> CairnError {
            CairnError(.malformedImage, message, path: name, offset: offset.map { UInt64($0) }, hint: hint)
        }
        func refuse(_ message: String, at offset: Int, hint: String? = nil) -> CairnError {
            CairnError(.unsupported, message, path: name, offset: UInt64(offset), hint: hint)
        }

        guard b.count >= QCOW2.v2HeaderLength,
              let magic = b.u32(at: QCOW2.Field.magic),
              let version = b.u32(at: QCOW2.Field.version),
              let backingFileOffset = b.u64(at: QCOW2.Field.backingFileOffset),
              let backingFileSize = b.u32(at: QCOW2.Field.backingFileSize),
              let clusterBits = b.u32(at: QCOW2.Field.clusterBits),
              let size = b.u64(at: QCOW2.Field.size),
              let cryptMethod = b.u32(at: QCOW2.Field.cryptMethod),
              let l1Size = b.u32(at: QCOW2.Field.l1Size),
              let l1TableOffset = b.u64(at: QCOW2.Field.l1TableOffset),
              let refcountTableOffset = b.u64(at: QCOW2.Field.refcountTableOffset),
              let refcountTableClusters = b.u32(at: QCOW2.Field.refcountTableClusters),
              let nbSnapshots = b.u32(at: QCOW2.Field.nbSnapshots),
              let snapshotsOffset = b.u64(at: QCOW2.Field.snapshotsOffset)
        else {
            throw fail("qcow2 header is truncated: the file holds \(fileSize) bytes, a header needs at least \(QCOW2.v2HeaderLength)")
        }
        guard magic == QCOW2.magic else {
            throw fail("not a qcow2 image: magic is \(hex(UInt64(magic))), expected \(hex(UInt64(QCOW2.magic)))", at: 0)
        }
        guard version == 2 || version == 3 else {
            throw refuse("qcow2 version \(version) is not supported (only versions 2 and 3)", at: QCOW2.Field.version)
        }
        guard clusterBits >= QCOW2.minClusterBits else {
            throw fail("qcow2 cluster_bits \(clusterBits) is below the minimum \(QCOW2.minClusterBits) (512-byte clusters)", at: QCOW2.Field.clusterBits)
        }
        guard clusterBits <= QCOW2.maxClusterBits else {
            throw refuse("qcow2 cluster_bits \(clusterBits) is above the maximum \(QCOW2.maxClusterBits) (2 MiB clusters)", at: QCOW2.Field.clusterBits)
        }
        let clusterSize = UInt64(1) << UInt64(clusterBits)

        // Version 3 fields.
        var incompatible: UInt64 = 0, compatible: UInt64 = 0, autoclear: UInt64 = 0
        var refcountOrder = QCOW2.defaultRefcountOrder
        var headerLength = UInt32(QCOW2.v2HeaderLength)
        var compressionByte: UInt8 = 0
        if version >= 3 {
            guard let inc = b.u64(at: QCOW2.Field.incompatibleFeatures),
                  let comp = b.u64(at: QCOW2.Field.compatibleFeatures),
                  let auto = b.u64(at: QCOW2.Field.autoclearFeatures),
                  let order = b.u32(at: QCOW2.Field.refcountOrder),
                  let length = b.u32(at: QCOW2.Field.headerLength)
            else {
                throw fail("qcow2 version 3 header is truncated: the file holds \(fileSize) bytes, the header needs at least \(QCOW2.v3MinHeaderLength)")
            }
            guard length >= QCOW2.v3MinHeaderLength, length % 8 == 0 else {
                throw fail("qcow2 header_length \(length) is invalid (version 3 needs at least \(QCOW2.v3MinHeaderLength) and a multiple of 8)", at: QCOW2.Field.headerLength)
            }
            guard UInt64(length) <= clusterSize, UInt64(length) <= fileSize else {
                throw fail("qcow2 header_length \(length) exceeds the first cluster (\(clusterSize) bytes) or the file (\(fileSize) bytes)", at: QCOW2.Field.headerLength)
            }
            incompatible = inc
            compatible = comp
            autoclear = auto
            refcountOrder = order
            headerLength = length
            if length > UInt32(QCOW2.Field.compressionType) {
                guard let byte = b.u8(at: QCOW2.Field.compressionType) else {
                    throw fail("qcow2 header is truncated before compression_type (header_length \(length))", at: QCOW2.Field.compressionType)
                }
                compressionByte = byte
            }
        }

        // Header extensions: from header_length up to the backing file name or the end of
        // the first cluster (whatever of it we were given).
        var extensionEnd = min(UInt64(b.count), clusterSize)
        if backingFileOffset != 0, backingFileOffset < extensionEnd { extensionEnd = backingFileOffset }
        let extensions = try Self.parseExtensions(b, from: Int(headerLength), to: Int(extensionEnd), fail: { fail($0, at: $1) })

        // Incompatible features: refuse what we cannot read, name unknown bits.
        if incompatible & QCOW2.Incompatible.externalDataFile != 0 {
            throw refuse("qcow2 images with an external data file (incompatible feature bit 2) are not supported",
                       at: QCOW2.Field.incompatibleFeatures,
                       hint: "convert it to a self-contained image with qemu-img convert -O qcow2")
        }
        if incompatible & QCOW2.Incompatible.extendedL2 != 0 {
            throw refuse("qcow2 images with extended L2 entries (subclusters) are not supported; convert with qemu-img convert -O qcow2 -o extended_l2=off",
                       at: QCOW2.Field.incompatibleFeatures)
        }
        let unknown = incompatible & ~QCOW2.Incompatible.known
        if unknown != 0 {
            let bits = (0..<64).filter { unknown & (UInt64(1) << UInt64($0)) != 0 }
            let described = bits.map { bit in
                extensions.incompatibleNames[bit].map { "bit \(bit) (\($0))" } ?? "bit \(bit)"
            }
            throw refuse("qcow2 image uses unknown incompatible feature \(described.joined(separator: ", ")) (incompatible_features \(hex(incompatible)))",
                       at: QCOW2.Field.incompatibleFeatures, hint: "a newer QEMU wrote this image; convert it with qemu-img convert -O qcow2")
        }

        guard cryptMethod == 0 else {
            throw refuse("encrypted qcow2 images are not supported (crypt_method \(cryptMethod)); decrypt with qemu-img convert", at: QCOW2.Field.cryptMethod)
        }

        guard let compressionType = CompressionType(rawValue: compressionByte) else {
            throw refuse("qcow2 compression_type \(compressionByte) is not supported (only 0 deflate and 1 zstd)", at: QCOW2.Field.compressionType)
        }
        let typeBit = incompatible & QCOW2.Incompatible.compressionType != 0
        guard typeBit == (compressionType != .deflate) else {
            throw fail("qcow2 compression_type \(compressionByte) does not match incompatible feature bit 3 (\(typeBit ? "set" : "clear"))", at: QCOW2.Field.compressionType)
        }

        guard refcountOrder <= QCOW2.maxRefcountOrder else {
            throw fail("qcow2 refcount_order \(refcountOrder) exceeds the maximum \(QCOW2.maxRefcountOrder)", at: QCOW2.Field.refcountOrder)
        }
        guard refcountTableOffset % clusterSize == 0 else {
            throw fail("qcow2 refcount_table_offset \(hex(refcountTableOffset)) is not aligned to the cluster size \(clusterSize)", at: QCOW2.Field.refcountTableOffset)
        }

        // Virtual size and the L1 table that must cover it.
        guard size <= UInt64(Int64.max) else {
            throw fail("qcow2 virtual size \(size) (field size) is larger than any image can be", at: QCOW2.Field.size)
        }
        let l2Entries = clusterSize / 8
        let clusters = size / clusterSize + (size % clusterSize == 0 ? 0 : 1)
        let neededL1 = clusters / l2Entries + (clusters % l2Entries == 0 ? 0 : 1)
        let maxL1Entries = QCOW2.maxL1TableBytes / 8
        guard neededL1 <= maxL1Entries else {
            throw fail("qcow2 virtual size \(size) (field size) needs \(neededL1) L1 entries, more than the 32 MiB L1 table QEMU allows with \(clusterSize)-byte clusters",
                       at: QCOW2.Field.size)
        }
        guard UInt64(l1Size) <= maxL1Entries else {
            throw fail("qcow2 l1_size \(l1Size) exceeds the 32 MiB limit (\(maxL1Entries) entries)", at: QCOW2.Field.l1Size)
        }
        guard UInt64(l1Size) >= neededL1 else {
            throw fail("qcow2 l1_size \(l1Size) is too small for the virtual size \(size) (needs \(neededL1) entries)", at: QCOW2.Field.l1Size)
        }
        if l1Size > 0 {
            guard l1TableOffset % clusterSize == 0, l1TableOffset != 0 else {
                throw fail("qcow2 L1 table offset \(hex(l1TableOffset)) is not a cluster-aligned offset after the header (cluster size \(clusterSize))", at: QCOW2.Field.l1TableOffset)
            }
            let l1Bytes = UInt64(l1Size) * 8
            guard l1TableOffset <= fileSize, l1Bytes <= fileSize - l1TableOffset else {
                throw fail("qcow2 L1 table offset \(hex(l1TableOffset)) with \(l1Size) entries lies past the end of the file (size \(fileSize))", at: QCOW2.Field.l1TableOffset)
            }
        }

        // Backing file name: at most 1023 bytes, inside the first cluster.
        var backingFileName: String?
        if backingFileOffset != 0 {
            guard backingFileSize <= QCOW2.maxBackingFileNameLength else {
                throw fail("qcow2 backing_file_size \(backingFileSize) exceeds the maximum \(QCOW2.maxBackingFileNameLength)", at: QCOW2.Field.backingFileSize)
            }
            guard backingFileOffset < clusterSize,
                  let nameBytes = b.slice(at: Int(backingFileOffset), count: Int(backingFileSize))
            else {
                throw fail("qcow2 backing_file_offset \(hex(backingFileOffset)) with backing_file_size \(backingFileSize) lies outside the first cluster or past the end of the file (size \(fileSize))",
                           at: QCOW2.Field.backingFileOffset)
            }
            if !nameBytes.isEmpty { backingFileName = String(decoding: nameBytes, as: UTF8.self) }
        }

        self.version = version
        self.backingFileOffset = backingFileOffset
        self.backingFileSize = backingFileSize
        self.clusterBits = clusterBits
        self.size = size
        self.cryptMethod = cryptMethod
        self.l1Size = l1Size
        self.l1TableOffset = l1TableOffset
        self.refcountTableOffset = refcountTableOffset
        self.refcountTableClusters = refcountTableClusters
        self.nbSnapshots = nbSnapshots
        self.snapshotsOffset = snapshotsOffset
        self.incompatibleFeatures = incompatible
        self.compatibleFeatures = compatible
        self.autoclearFeatures = autoclear
        self.refcountOrder = refcountOrder
        self.headerLength = headerLength
        self.compressionType = compressionType
        self.backingFileName = backingFileName
        self.backingFormat = extensions.backingFormat
    }

    private struct Extensions {
        var backingFormat: String?
        var incompatibleNames: [Int: String] = [:]
    }

    /// Walks the header extensions in `[start, end)`. Unknown types are skipped; an extension
    /// that overruns the area is an error.
    private static func parseExtensions(_ b: CheckedBytes, from start: Int, to end: Int,
                                        fail: (String, Int) -> CairnError) throws -> Extensions {
        var out = Extensions()
        var pos = start
        while pos <= end - 8 {
            guard let type = b.u32(at: pos), let length32 = b.u32(at: pos + 4) else { break }
            if type == QCOW2.Extension.end { break }
            let length = Int(length32)
            let dataStart = pos + 8
            guard length <= end - dataStart, let data = b.slice(at: dataStart, count: length) else {
                throw fail("qcow2 header extension \(hex(UInt64(type))) of \(length) bytes runs past the end of the header area (\(end) bytes)", pos)
            }
            switch type {
            case QCOW2.Extension.backingFormat:
                out.backingFormat = String(decoding: data, as: UTF8.self)
            case QCOW2.Extension.featureNameTable:
                let entry = QCOW2.Extension.featureNameEntrySize
                var e = data.startIndex
                while e + entry <= data.endIndex {
                    if data[e] == 0 {  // incompatible feature
                        let bit = Int(data[e + 1])
                        let nameBytes = data[(e + 2)..<(e + entry)].prefix { $0 != 0 }
                        out.incompatibleNames[bit] = String(decoding: nameBytes, as: UTF8.self)
                    }
                    e += entry
                }
            default:
                break
            }
            // Data is padded to a multiple of 8.
            let padded = (length + 7) / 8 * 8
            guard padded <= end - dataStart else { break }
            pos = dataStart + padded
        }
        return out
    }
}
