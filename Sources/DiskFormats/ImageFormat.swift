import CairnCore

/// The disk image formats Cairn reads and writes.
package enum ImageFormat: String, Sendable, CaseIterable {
    case raw
    case qcow2

    /// Detects the format from the first bytes of `source`: the qcow2 magic "QFI\xfb" at
    /// offset 0 means qcow2; anything else (including a source shorter than 4 bytes) is raw.
    package static func detect(_ source: any BlockSource) throws -> ImageFormat {
        guard source.size >= UInt64(QCOW2.magicBytes.count) else { return .raw }
        let head = try source.readBytes(at: 0, count: QCOW2.magicBytes.count)
        return head == QCOW2.magicBytes ? .qcow2 : .raw
    }
}
