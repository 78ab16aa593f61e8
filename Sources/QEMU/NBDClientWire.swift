// The bytes of the NBD protocol as the client sees them (NetworkBlockDevice/nbd `doc/proto.md`):
// sizes and limits, pure decoders that never trap on what a server sends (the protocol's
// numbers are CairnCore/NBDNumbers.swift, shared with the server; the socket primitives with
// poll-based timeouts are NBDClientSocket.swift). NBDClient.swift holds the API, NBDClientHandshake.swift
// and NBDClientConnection.swift the two phases.
import CairnCore
#if canImport(Glibc)
import Glibc
#endif

/// What the client needs beyond the protocol's numbers (CairnCore/NBDNumbers.swift, shared with
/// the server): header sizes, the limits it applies to what a server sends, and names for
/// messages. Big-endian on the wire.
enum NBDWire {
    static let requestHeaderSize = 28
    static let simpleHeaderSize = 16
    static let chunkHeaderSize = 20
    static let optionReplyHeaderSize = 20

    // Limits the client applies to what a server sends (none is reached by a sane server).
    /// Largest option reply payload accepted during the handshake.
    static let maxOptionReply = 1 << 20
    /// Largest BLOCK_STATUS chunk payload (4 M descriptors).
    static let maxBlockStatusPayload: UInt32 = 32 << 20 + 4
    /// Largest error chunk payload (the message length is 16 bits).
    static let maxErrorPayload: UInt32 = 6 + 65535 + 8
    /// Longest export name or query the protocol allows.
    static let maxString = 4096

    /// The name of an NBD error value ("EIO"); the protocol fixes these numbers.
    static func errorName(_ code: UInt32) -> String {
        switch code {
        case 1: "EPERM"
        case 5: "EIO"
        case 12: "ENOMEM"
        case 22: "EINVAL"
        case 28: "ENOSPC"
        case 75: "EOVERFLOW"
        case 95: "ENOTSUP"
        case 108: "ESHUTDOWN"
        default: "error \(code)"
        }
    }

    /// "EIO (input/output error)".
    static func errorText(_ code: UInt32) -> String {
        let meaning: String? = switch code {
        case 1: "operation not permitted"
        case 5: "input/output error"
        case 12: "out of memory"
        case 22: "invalid argument"
        case 28: "no space left on device"
        case 75: "value too large"
        case 95: "operation not supported"
        case 108: "server shutting down"
        default: nil
        }
        return meaning.map { "\(errorName(code)) (\($0))" } ?? errorName(code)
    }

    /// The name of an option reply type, for messages.
    static func optionReplyName(_ type: UInt32) -> String {
        switch type {
        case NBDOptionReply.ack: "NBD_REP_ACK"
        case NBDOptionReply.server: "NBD_REP_SERVER"
        case NBDOptionReply.info: "NBD_REP_INFO"
        case NBDOptionReply.metaContext: "NBD_REP_META_CONTEXT"
        case NBDOptionReply.errUnsupported: "NBD_REP_ERR_UNSUP"
        case NBDOptionReply.errPolicy: "NBD_REP_ERR_POLICY"
        case NBDOptionReply.errInvalid: "NBD_REP_ERR_INVALID"
        case NBDOptionReply.errPlatform: "NBD_REP_ERR_PLATFORM"
        case NBDOptionReply.errTLSRequired: "NBD_REP_ERR_TLS_REQD"
        case NBDOptionReply.errUnknown: "NBD_REP_ERR_UNKNOWN"
        case NBDOptionReply.errShutdown: "NBD_REP_ERR_SHUTDOWN"
        case NBDOptionReply.errBlockSizeRequired: "NBD_REP_ERR_BLOCK_SIZE_REQD"
        case NBDOptionReply.errTooBig: "NBD_REP_ERR_TOO_BIG"
        default: "reply type 0x\(String(type, radix: 16))"
        }
    }
}

// MARK: - Bytes

/// Reads big-endian fields from untrusted bytes; every read returns nil when too few remain.
struct NBDByteReader {
    private let bytes: [UInt8]
    private(set) var index = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - index }

    mutating func u16() -> UInt16? { integer() }
    mutating func u32() -> UInt32? { integer() }
    mutating func u64() -> UInt64? { integer() }

    mutating func bytes(_ count: Int) -> [UInt8]? {
        guard count >= 0, count <= remaining else { return nil }
        defer { index += count }
        return Array(bytes[index..<index + count])
    }

    /// `count` bytes as text (invalid UTF-8 is replaced, not rejected: names are only shown).
    mutating func string(_ count: Int) -> String? {
        bytes(count).map { String(decoding: $0, as: UTF8.self) }
    }

    private mutating func integer<T: FixedWidthInteger>() -> T? {
        let size = MemoryLayout<T>.size
        guard size <= remaining else { return nil }
        var v: T = 0
        for i in index..<index + size { v = v << 8 | T(bytes[i]) }
        index += size
        return v
    }
}

extension Array where Element == UInt8 {
    /// Appends `value` big-endian.
    mutating func appendBE<T: FixedWidthInteger>(_ value: T) {
        var v = value.bigEndian
        Swift.withUnsafeBytes(of: &v) { append(contentsOf: $0) }
    }
}

// MARK: - Messages the client sends

enum NBDEncode {
    /// One option: IHAVEOPT, the option, its data.
    static func option(_ option: UInt32, _ data: [UInt8] = []) -> [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(16 + data.count)
        b.appendBE(NBDMagic.option)
        b.appendBE(option)
        b.appendBE(UInt32(data.count))
        b += data
        return b
    }

    /// The data of NBD_OPT_GO: the export name and the information items asked for.
    static func goData(export: String, items: [UInt16]) -> [UInt8] {
        var b: [UInt8] = []
        b.appendBE(UInt32(export.utf8.count))
        b += Array(export.utf8)
        b.appendBE(UInt16(items.count))
        for i in items { b.appendBE(i) }
        return b
    }

    /// The data of NBD_OPT_SET_META_CONTEXT: the export name and the queries.
    static func metaContextData(export: String, queries: [String]) -> [UInt8] {
        var b: [UInt8] = []
        b.appendBE(UInt32(export.utf8.count))
        b += Array(export.utf8)
        b.appendBE(UInt32(queries.count))
        for q in queries {
            b.appendBE(UInt32(q.utf8.count))
            b += Array(q.utf8)
        }
        return b
    }

    /// A request header (no payload: the client never writes).
    static func request(into b: inout [UInt8], type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32) {
        b.appendBE(NBDMagic.request)
        b.appendBE(flags)
        b.appendBE(type)
        b.appendBE(cookie)
        b.appendBE(offset)
        b.appendBE(length)
    }
}

// MARK: - Messages the server sends

/// A protocol violation by the server: the stream can no longer be trusted.
struct NBDViolation: Error, Equatable, CustomStringConvertible {
    var message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}

/// The header of an option reply.
struct NBDOptionReplyHeader: Equatable {
    var option: UInt32
    var type: UInt32
    var length: UInt32

    var isError: Bool { type & NBDOptionReply.errorBit != 0 }

    /// Decodes 20 bytes; checks the magic and that the reply is to `option`.
    static func decode(_ bytes: [UInt8], expecting option: UInt32) -> Result<NBDOptionReplyHeader, NBDViolation> {
        var r = NBDByteReader(bytes)
        guard let magic = r.u64(), let opt = r.u32(), let type = r.u32(), let length = r.u32() else {
            return .failure(NBDViolation("an option reply header shorter than 20 bytes"))
        }
        guard magic == NBDMagic.optionReply else {
            return .failure(NBDViolation("an option reply with magic 0x\(String(magic, radix: 16)) instead of 0x3e889045565a9"))
        }
        guard opt == option else {
            return .failure(NBDViolation("a reply to option \(opt) while option \(option) was pending"))
        }
        guard length <= UInt32(NBDWire.maxOptionReply) else {
            return .failure(NBDViolation("an option reply of \(length) bytes (more than \(NBDWire.maxOptionReply))"))
        }
        return .success(NBDOptionReplyHeader(option: opt, type: type, length: length))
    }
}

/// An `NBD_REP_INFO` item the client understands.
enum NBDInfoItem: Equatable {
    case export(size: UInt64, flags: UInt16)
    case blockSize(minimum: UInt32, preferred: UInt32, maximum: UInt32)
    /// An item the client did not ask for or does not know (name, description...).
    case other(UInt16)

    static func decode(_ payload: [UInt8]) -> Result<NBDInfoItem, NBDViolation> {
        var r = NBDByteReader(payload)
        guard let type = r.u16() else { return .failure(NBDViolation("an NBD_REP_INFO reply shorter than 2 bytes")) }
        switch type {
        case NBDInfo.export:
            guard payload.count == 12, let size = r.u64(), let flags = r.u16() else {
                return .failure(NBDViolation("an NBD_INFO_EXPORT item of \(payload.count) bytes (12 expected)"))
            }
            return .success(.export(size: size, flags: flags))
        case NBDInfo.blockSize:
            guard payload.count == 14, let minimum = r.u32(), let preferred = r.u32(), let maximum = r.u32() else {
                return .failure(NBDViolation("an NBD_INFO_BLOCK_SIZE item of \(payload.count) bytes (14 expected)"))
            }
            return .success(.blockSize(minimum: minimum, preferred: preferred, maximum: maximum))
        default:
            return .success(.other(type))
        }
    }
}

/// The size constraints of an export (`NBD_INFO_BLOCK_SIZE`) and the request sizes derived from them.
struct NBDBlockLimits: Equatable {
    /// Requests start and end on multiples of this (a power of two, 1 ... 64 KiB).
    var minimum: UInt32 = 1
    var preferred: UInt32 = 4096
    /// Largest READ payload the server accepts (0: not announced).
    var maximum: UInt32 = 0

    /// Read requests are never longer than this.
    static let defaultReadLimit: UInt64 = 32 << 20
    /// BLOCK_STATUS requests are never longer than this.
    static let statusLimit: UInt64 = 2 << 30

    init() {}

    /// Limits from the server's announcement; values the protocol forbids are ignored
    /// (a minimum that is not a power of two up to 64 KiB, a maximum below the minimum).
    init(minimum: UInt32, preferred: UInt32, maximum: UInt32) {
        if minimum >= 1, minimum <= 65536, minimum & (minimum - 1) == 0 { self.minimum = minimum }
        if preferred >= self.minimum { self.preferred = preferred }
        if maximum >= self.minimum { self.maximum = maximum }
    }

    /// Longest READ request: the server's maximum (else 32 MiB), capped at 32 MiB, a multiple of `minimum`.
    var readLimit: UInt64 {
        let cap = maximum > 0 ? min(UInt64(maximum), Self.defaultReadLimit) : Self.defaultReadLimit
        return max(UInt64(minimum), cap / UInt64(minimum) * UInt64(minimum))
    }

    /// Longest BLOCK_STATUS request, a multiple of `minimum`.
    var statusRequestLimit: UInt64 { Self.statusLimit / UInt64(minimum) * UInt64(minimum) }
}

/// The start of a reply in the transmission phase.
enum NBDReplyHeader: Equatable {
    case simple(error: UInt32, cookie: UInt64)
    case chunk(flags: UInt16, type: UInt16, cookie: UInt64, length: UInt32)
    /// A structured chunk: `chunkHeaderSize` bytes are needed to decode it.
    case needMore

    /// Decodes a reply header from its first 16 bytes (a simple reply) or 20 bytes (a chunk).
    static func decode(_ bytes: [UInt8]) -> Result<NBDReplyHeader, NBDViolation> {
        var r = NBDByteReader(bytes)
        guard let magic = r.u32() else { return .failure(NBDViolation("a reply header shorter than 4 bytes")) }
        switch magic {
        case NBDMagic.simpleReply:
            guard let error = r.u32(), let cookie = r.u64() else { return .failure(NBDViolation("a simple reply header shorter than 16 bytes")) }
            return .success(.simple(error: error, cookie: cookie))
        case NBDMagic.structuredReply:
            guard bytes.count >= NBDWire.chunkHeaderSize else { return .success(.needMore) }
            guard let flags = r.u16(), let type = r.u16(), let cookie = r.u64(), let length = r.u32() else {
                return .failure(NBDViolation("a structured reply header shorter than 20 bytes"))
            }
            return .success(.chunk(flags: flags, type: type, cookie: cookie, length: length))
        default:
            return .failure(NBDViolation("a reply with magic 0x\(String(magic, radix: 16)) (neither a simple reply nor a structured chunk)"))
        }
    }
}

/// One block status descriptor.
struct NBDDescriptor: Equatable, Sendable {
    var length: UInt32
    var flags: UInt32
}

/// The payload of a chunk other than OFFSET_DATA (whose data the reader streams into place).
enum NBDChunkPayload: Equatable {
    case none
    case hole(offset: UInt64, length: UInt32)
    case blockStatus(context: UInt32, descriptors: [NBDDescriptor])
    case error(code: UInt32, message: String, offset: UInt64?)

    /// Decodes the payload of a chunk of `type`; anything the protocol forbids is a violation.
    /// Unknown types with bit 15 set are errors (the protocol says so); other unknown types are not.
    static func decode(type: UInt16, _ payload: [UInt8]) -> Result<NBDChunkPayload, NBDViolation> {
        var r = NBDByteReader(payload)
        switch type {
        case NBDReplyType.none:
            guard payload.isEmpty else { return .failure(NBDViolation("an NBD_REPLY_TYPE_NONE chunk with \(payload.count) bytes of payload")) }
            return .success(.none)
        case NBDReplyType.offsetHole:
            guard payload.count == 12, let offset = r.u64(), let length = r.u32() else {
                return .failure(NBDViolation("an OFFSET_HOLE chunk of \(payload.count) bytes (12 expected)"))
            }
            guard length > 0 else { return .failure(NBDViolation("an OFFSET_HOLE chunk of length 0")) }
            return .success(.hole(offset: offset, length: length))
        case NBDReplyType.blockStatus:
            guard payload.count >= 12, (payload.count - 4) % 8 == 0, let context = r.u32() else {
                return .failure(NBDViolation("a BLOCK_STATUS chunk of \(payload.count) bytes (4 + 8n, n > 0, expected)"))
            }
            var descriptors: [NBDDescriptor] = []
            descriptors.reserveCapacity((payload.count - 4) / 8)
            while let length = r.u32(), let flags = r.u32() {
                guard length > 0 else { return .failure(NBDViolation("a block status descriptor of length 0")) }
                descriptors.append(NBDDescriptor(length: length, flags: flags))
            }
            return .success(.blockStatus(context: context, descriptors: descriptors))
        default:
            guard type & NBDReplyType.errorBit != 0 else {
                return .failure(NBDViolation("a structured reply chunk of unknown type \(type)"))
            }
            guard let code = r.u32(), let messageLength = r.u16(), let message = r.string(Int(messageLength)) else {
                return .failure(NBDViolation("an error chunk of \(payload.count) bytes whose message does not fit"))
            }
            var offset: UInt64?
            if type == NBDReplyType.errorOffset {
                guard r.remaining == 8, let o = r.u64() else {
                    return .failure(NBDViolation("an ERROR_OFFSET chunk without its 8-byte offset"))
                }
                offset = o
            } else if type == NBDReplyType.error, r.remaining != 0 {
                return .failure(NBDViolation("an ERROR chunk with \(r.remaining) bytes after its message"))
            }
            // Error 0 is not allowed; report it as EIO rather than as success.
            return .success(.error(code: code == 0 ? 5 : code, message: message, offset: offset))
        }
    }
}

/// Which bytes of one READ the reply has delivered: content chunks must lie inside the
/// request and must not overlap; the reply is complete when every byte came exactly once.
struct NBDReadAssembly: Equatable {
    let offset: UInt64
    let length: UInt64
    /// Delivered ranges relative to `offset`, ascending, merged.
    private(set) var delivered: [Range<UInt64>] = []
    private(set) var deliveredBytes: UInt64 = 0

    init(offset: UInt64, length: UInt64) {
        self.offset = offset
        self.length = length
    }

    var isComplete: Bool { deliveredBytes == length }

    /// Records `count` bytes at absolute `start`; returns their position in the request's buffer.
    mutating func claim(_ start: UInt64, count: UInt64) -> Result<Int, NBDViolation> {
        guard count > 0 else { return .failure(NBDViolation("a content chunk of 0 bytes")) }
        guard start >= offset, start - offset <= length, count <= length - (start - offset) else {
            return .failure(NBDViolation("a content chunk for bytes \(start)+\(count) outside the request \(offset)+\(length)"))
        }
        let lo = start - offset
        let hi = lo + count
        // Find the first delivered range that ends after `lo` (chunks usually come in order).
        var i = delivered.count
        if let last = delivered.last, last.upperBound <= lo {
            i = delivered.count
        } else {
            var a = 0, b = delivered.count
            while a < b {
                let m = (a + b) / 2
                if delivered[m].upperBound <= lo { a = m + 1 } else { b = m }
            }
            i = a
        }
        if i < delivered.count, delivered[i].lowerBound < hi {
            return .failure(NBDViolation("a content chunk for bytes \(start)+\(count) overlapping bytes already received"))
        }
        var range = lo..<hi
        var removeFrom = i
        var removeTo = i
        if i > 0, delivered[i - 1].upperBound == lo {
            range = delivered[i - 1].lowerBound..<hi
            removeFrom = i - 1
        }
        if i < delivered.count, delivered[i].lowerBound == hi {
            range = range.lowerBound..<delivered[i].upperBound
            removeTo = i + 1
        }
        delivered.replaceSubrange(removeFrom..<removeTo, with: [range])
        deliveredBytes += count
        return .success(Int(lo))
    }
}
