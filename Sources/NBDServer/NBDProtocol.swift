// The server side of the NBD protocol's messages; the numbers are in CairnCore/NBDNumbers.swift.
import CairnCore

/// A decoded transmission request header.
struct NBDRequest: Sendable {
    var flags: UInt16
    var type: UInt16
    var handle: UInt64
    var offset: UInt64
    var length: UInt32

    static let headerSize = 28
}
