import CairnCore

/// The disk image formats Cairn reads and writes.
package enum ImageFormat: String, Sendable, CaseIterable {
    case raw
    case qcow2
    /// VMware: a sparse extent ("KDMV") or a text descriptor naming extents.
    case vmdk
    /// Microsoft Virtual PC / Hyper-V VHD (qemu's "vpc"): fixed, dynamic, differencing.
    case vhd
    /// Hyper-V VHDX.
    case vhdx

    /// Detects the format from the header (or, for a fixed VHD, the footer in the last 512
    /// bytes, accepted only when its checksum is right). Anything else is raw. With
    /// `--format raw` nothing is probed at all.
    package static func detect(_ source: any BlockSource) throws -> ImageFormat {
        let size = source.size
        if size >= 8 {
            let head = try source.readBytes(at: 0, count: Int(min(size, 64)))
            if head.starts(with: QCOW2.magicBytes) { return .qcow2 }
            if head.starts(with: Array("KDMV".utf8)) { return .vmdk }
            if head.starts(with: Array("vhdxfile".utf8)) { return .vhdx }
            if head.starts(with: Array("conectix".utf8)) { return .vhd }
            if head.starts(with: Array("# Disk DescriptorFile".utf8)) { return .vmdk }
        }
        if size >= 512 {
            let tail = try source.readBytes(at: size - 512, count: 512)
            if tail.starts(with: Array("conectix".utf8)), vhdFooterChecksumIsValid(tail) { return .vhd }
        }
        return .raw
    }

    /// VHD footer checksum: the ones' complement of the byte sum of the footer with the
    /// checksum field (offset 64, 4 bytes, big-endian) taken as zero.
    package static func vhdFooterChecksumIsValid(_ footer: [UInt8]) -> Bool {
        guard footer.count >= 512 else { return false }
        var sum: UInt32 = 0
        for (i, b) in footer.prefix(512).enumerated() where !(64..<68).contains(i) { sum &+= UInt32(b) }
        let stored = UInt32(footer[64]) << 24 | UInt32(footer[65]) << 16 | UInt32(footer[66]) << 8 | UInt32(footer[67])
        return ~sum == stored
    }
}
