// The bytes of the NBD protocol as the client sees them (NetworkBlockDevice/nbd `doc/proto.md`):
// numbers, pure decoders that never trap on what a server sends, and the socket primitives with
// poll-based timeouts. `NBDClient.swift` holds the handshake, the reply reader and the API.
import CairnCore
#if canImport(Glibc)
import Glibc
#endif

/// Every number of the protocol the client uses, in one place. Big-endian on the wire.
enum NBDWire {
    /// "NBDMAGIC", the first 8 bytes from the server.
    static let initPassword: UInt64 = 0x4E42_444D_4147_4943
    /// "IHAVEOPT": newstyle negotiation, and the prefix of every client option.
    static let optionMagic: UInt64 = 0x4948_4156_454F_5054
    /// The second word of an oldstyle greeting (not supported).
    static let oldstyleMagic: UInt64 = 0x0000_4202_8186_1253
    /// Prefix of every option reply.
    static let optionReplyMagic: UInt64 = 0x0003_E889_0455_65A9
    /// Prefix of a request (28-byte header).
    static let requestMagic: UInt32 = 0x2560_9513
    /// Prefix of a simple reply (16-byte header).
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    /// Prefix of a structured reply chunk (20-byte header).
    static let structuredReplyMagic: UInt32 = 0x668E_33EF

    static let requestHeaderSize = 28
    static let simpleHeaderSize = 16
    static let chunkHeaderSize = 20
    static let optionReplyHeaderSize = 20

    // Handshake flags (server, 16 bits) and client flags (32 bits).
    static let flagFixedNewstyle: UInt16 = 1 << 0
    static let flagNoZeroes: UInt16 = 1 << 1
    static let clientFixedNewstyle: UInt32 = 1 << 0
    static let clientNoZeroes: UInt32 = 1 << 1

    // Transmission flags.
    static let transmissionReadOnly: UInt16 = 1 << 1

    // Options (`NBD_OPT_*`).
    static let optExportName: UInt32 = 1
    static let optAbort: UInt32 = 2
    static let optList: UInt32 = 3
    static let optGo: UInt32 = 7
    static let optStructuredReply: UInt32 = 8
    static let optSetMetaContext: UInt32 = 10

    // Option replies (`NBD_REP_*`); errors have bit 31 set.
    static let repAck: UInt32 = 1
    static let repServer: UInt32 = 2
    static let repInfo: UInt32 = 3
    static let repMetaContext: UInt32 = 4
    static let repErrorBit: UInt32 = 1 << 31
    static let repErrUnsupported: UInt32 = repErrorBit | 1
    static let repErrPolicy: UInt32 = repErrorBit | 2
    static let repErrInvalid: UInt32 = repErrorBit | 3
    static let repErrPlatform: UInt32 = repErrorBit | 4
    static let repErrTLSRequired: UInt32 = repErrorBit | 5
    static let repErrUnknown: UInt32 = repErrorBit | 6
    static let repErrShutdown: UInt32 = repErrorBit | 7
    static let repErrBlockSizeRequired: UInt32 = repErrorBit | 8
    static let repErrTooBig: UInt32 = repErrorBit | 9

    // Information items of `NBD_REP_INFO`.
    static let infoExport: UInt16 = 0
    static let infoBlockSize: UInt16 = 3

    // Commands.
    static let cmdRead: UInt16 = 0
    static let cmdDisconnect: UInt16 = 2
    static let cmdBlockStatus: UInt16 = 7

    // Structured reply chunks.
    static let replyFlagDone: UInt16 = 1 << 0
    static let chunkNone: UInt16 = 0
    static let chunkOffsetData: UInt16 = 1
    static let chunkOffsetHole: UInt16 = 2
    static let chunkBlockStatus: UInt16 = 5
    static let chunkErrorBit: UInt16 = 1 << 15
    static let chunkError: UInt16 = chunkErrorBit | 1
    static let chunkErrorOffset: UInt16 = chunkErrorBit | 2

    // Error values of replies.
    static let errShutdown: UInt32 = 108

    // Meta contexts: `base:allocation` bits and QEMU's `qemu:dirty-bitmap:NAME` bit.
    static let baseAllocation = "base:allocation"
    static let stateHole: UInt32 = 1 << 0
    static let stateZero: UInt32 = 1 << 1
    static let stateDirty: UInt32 = 1 << 0

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
        case repAck: "NBD_REP_ACK"
        case repServer: "NBD_REP_SERVER"
        case repInfo: "NBD_REP_INFO"
        case repMetaContext: "NBD_REP_META_CONTEXT"
        case repErrUnsupported: "NBD_REP_ERR_UNSUP"
        case repErrPolicy: "NBD_REP_ERR_POLICY"
        case repErrInvalid: "NBD_REP_ERR_INVALID"
        case repErrPlatform: "NBD_REP_ERR_PLATFORM"
        case repErrTLSRequired: "NBD_REP_ERR_TLS_REQD"
        case repErrUnknown: "NBD_REP_ERR_UNKNOWN"
        case repErrShutdown: "NBD_REP_ERR_SHUTDOWN"
        case repErrBlockSizeRequired: "NBD_REP_ERR_BLOCK_SIZE_REQD"
        case repErrTooBig: "NBD_REP_ERR_TOO_BIG"
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
        b.appendBE(NBDWire.optionMagic)
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
        b.appendBE(NBDWire.requestMagic)
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

    var isError: Bool { type & NBDWire.repErrorBit != 0 }

    /// Decodes 20 bytes; checks the magic and that the reply is to `option`.
    static func decode(_ bytes: [UInt8], expecting option: UInt32) -> Result<NBDOptionReplyHeader, NBDViolation> {
        var r = NBDByteReader(bytes)
        guard let magic = r.u64(), let opt = r.u32(), let type = r.u32(), let length = r.u32() else {
            return .failure(NBDViolation("an option reply header shorter than 20 bytes"))
        }
        guard magic == NBDWire.optionReplyMagic else {
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
        case NBDWire.infoExport:
            guard payload.count == 12, let size = r.u64(), let flags = r.u16() else {
                return .failure(NBDViolation("an NBD_INFO_EXPORT item of \(payload.count) bytes (12 expected)"))
            }
            return .success(.export(size: size, flags: flags))
        case NBDWire.infoBlockSize:
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
        case NBDWire.simpleReplyMagic:
            guard let error = r.u32(), let cookie = r.u64() else { return .failure(NBDViolation("a simple reply header shorter than 16 bytes")) }
            return .success(.simple(error: error, cookie: cookie))
        case NBDWire.structuredReplyMagic:
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
        case NBDWire.chunkNone:
            guard payload.isEmpty else { return .failure(NBDViolation("an NBD_REPLY_TYPE_NONE chunk with \(payload.count) bytes of payload")) }
            return .success(.none)
        case NBDWire.chunkOffsetHole:
            guard payload.count == 12, let offset = r.u64(), let length = r.u32() else {
                return .failure(NBDViolation("an OFFSET_HOLE chunk of \(payload.count) bytes (12 expected)"))
            }
            guard length > 0 else { return .failure(NBDViolation("an OFFSET_HOLE chunk of length 0")) }
            return .success(.hole(offset: offset, length: length))
        case NBDWire.chunkBlockStatus:
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
            guard type & NBDWire.chunkErrorBit != 0 else {
                return .failure(NBDViolation("a structured reply chunk of unknown type \(type)"))
            }
            guard let code = r.u32(), let messageLength = r.u16(), let message = r.string(Int(messageLength)) else {
                return .failure(NBDViolation("an error chunk of \(payload.count) bytes whose message does not fit"))
            }
            var offset: UInt64?
            if type == NBDWire.chunkErrorOffset {
                guard r.remaining == 8, let o = r.u64() else {
                    return .failure(NBDViolation("an ERROR_OFFSET chunk without its 8-byte offset"))
                }
                offset = o
            } else if type == NBDWire.chunkError, r.remaining != 0 {
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

// MARK: - Socket

/// Why the socket could not carry on.
enum NBDSocketFailure: Error, Equatable {
    /// The peer closed the connection (end of stream).
    case closed
    case timedOut(String)
    case failed(call: String, errno: Int32)
    /// The other side broke the protocol (raised by the reader, carried the same way).
    case violation(String)

    var reason: String {
        switch self {
        case .closed: "the server closed the connection"
        case .timedOut(let what): what
        case .failed(let call, let err): "\(call) failed: \(String(cString: strerror(err))) (errno \(err))"
        case .violation(let what): "protocol violation by the server: \(what)"
        }
    }
}

/// Seconds on the monotonic clock.
func nbdNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Blocking-socket primitives with poll-based waits; never blocks past a deadline.
enum NBDSocket {
    /// Connects to `endpoint`, retrying while a unix socket does not exist yet or a server
    /// refuses connections (still starting) until `deadline`.
    static func connect(_ endpoint: NBDEndpoint, deadline: Double, name: String) throws -> Int32 {
        while true {
            let attempt: Result<Int32, NBDSocketFailure>
            switch endpoint {
            case .unix(let path): attempt = try connectUnix(path, deadline: deadline, name: name)
            case .tcp(let host, let port): attempt = try connectTCP(host, port, deadline: deadline, name: name)
            }
            switch attempt {
            case .success(let fd):
                return fd
            case .failure(let failure):
                if case .failed(_, let err) = failure, err == ENOENT || err == ECONNREFUSED || err == EAGAIN, nbdNow() < deadline {
                    usleep(50_000)
                    continue
                }
                throw CairnError(.io, "cannot connect to the NBD server at \(endpoint): \(failure.reason)", path: name,
                                 hint: "check that the server (qemu-nbd, qemu-storage-daemon, nbdkit) runs and listens there")
            }
        }
    }

    private static func connectUnix(_ path: String, deadline: Double, name: String) throws -> Result<Int32, NBDSocketFailure> {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard path.utf8.count < capacity else {
            throw CairnError(.usage, "the NBD socket path is longer than \(capacity - 1) bytes", path: path)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: path.utf8)
            raw[path.utf8.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(.failed(call: "socket", errno: errno)) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc == 0 { return .success(fd) }
        let err = errno
        _ = Glibc.close(fd)
        return .failure(.failed(call: "connect", errno: err))
    }

    private static func connectTCP(_ host: String, _ port: Int, deadline: Double, name: String) throws -> Result<Int32, NBDSocketFailure> {
        guard (1...65535).contains(port) else { throw CairnError(.usage, "NBD port \(port) is not in 1...65535", path: name) }
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw CairnError(.io, "cannot resolve the NBD host \(host): \(String(cString: gai_strerror(rc)))", path: name)
        }
        defer { freeaddrinfo(list) }
        var last = NBDSocketFailure.failed(call: "connect", errno: ECONNREFUSED)
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let a = entry {
            entry = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else {
                last = .failed(call: "socket", errno: errno)
                continue
            }
            var err: Int32 = 0
            if Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) != 0 {
                err = errno
                if err == EINPROGRESS {
                    if waitFor(fd, events: Int16(POLLOUT), until: deadline) {
                        var soError: Int32 = 0
                        var len = socklen_t(MemoryLayout<Int32>.size)
                        err = getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len) == 0 ? soError : errno
                    } else {
                        _ = Glibc.close(fd)
                        return .failure(.timedOut("no TCP connection within the timeout"))
                    }
                }
            }
            if err == 0 {
                _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
                var one: Int32 = 1
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return .success(fd)
            }
            _ = Glibc.close(fd)
            last = .failed(call: "connect", errno: err)
        }
        return .failure(last)
    }

    /// Waits until `fd` has `events` (or an error/hang-up) or `deadline` passes; false on timeout.
    static func waitFor(_ fd: Int32, events: Int16, until deadline: Double) -> Bool {
        while true {
            let left = deadline - nbdNow()
            if left <= 0 { return false }
            var p = pollfd(fd: fd, events: events, revents: 0)
            let rc = poll(&p, 1, Int32(min(left * 1000 + 1, 60_000)))
            if rc > 0 { return true }
            if rc < 0 && errno != EINTR { return true }  // let the next call report the error
        }
    }

    /// Sends all of `bytes`, waiting for buffer space until `deadline`.
    static func send(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, deadline: Double) -> NBDSocketFailure? {
        guard let base = bytes.baseAddress else { return nil }
        var done = 0
        while done < bytes.count {
            let n = Glibc.send(fd, base + done, bytes.count - done, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if n > 0 {
                done += n
                continue
            }
            let err = errno
            if n < 0 && err == EINTR { continue }
            if n < 0 && (err == EAGAIN || err == EWOULDBLOCK) {
                if !waitFor(fd, events: Int16(POLLOUT), until: deadline) {
                    return .timedOut("the server accepted no data within the timeout")
                }
                continue
            }
            return .failed(call: "send", errno: n < 0 ? err : EPIPE)
        }
        return nil
    }

    /// Fills `buffer` exactly; `wait` blocks until the socket may be readable (or throws).
    static func receive(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, wait: () throws(NBDSocketFailure) -> Void) throws(NBDSocketFailure) {
        guard let base = buffer.baseAddress else { return }
        var done = 0
        while done < buffer.count {
            let n = recv(fd, base + done, buffer.count - done, Int32(MSG_DONTWAIT))
            if n > 0 {
                done += n
                continue
            }
            if n == 0 { throw .closed }
            let err = errno
            if err == EINTR { continue }
            if err == EAGAIN || err == EWOULDBLOCK {
                try wait()
                continue
            }
            throw .failed(call: "recv", errno: err)
        }
    }
}

/// Buffered reads from the socket for the reply reader: headers and small payloads come from
/// a buffer; large payloads go straight into the caller's memory.
struct NBDReceiver: ~Copyable {
    let fd: Int32
    private let storage: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0
    private let wait: () throws(NBDSocketFailure) -> Void

    init(fd: Int32, capacity: Int = 256 << 10, wait: @escaping () throws(NBDSocketFailure) -> Void) {
        self.fd = fd
        storage = .allocate(byteCount: capacity, alignment: 16)
        self.wait = wait
    }

    deinit { storage.deallocate() }

    /// Fills `dst` exactly.
    mutating func read(into dst: UnsafeMutableRawBufferPointer) throws(NBDSocketFailure) {
        var done = 0
        while done < dst.count {
            if start < end {
                let n = min(end - start, dst.count - done)
                UnsafeMutableRawBufferPointer(rebasing: dst[done..<done + n])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: storage[start..<start + n]))
                start += n
                done += n
                continue
            }
            let left = dst.count - done
            if left >= storage.count / 2 {
                try NBDSocket.receive(fd, into: UnsafeMutableRawBufferPointer(rebasing: dst[done...]), wait: wait)
                return
            }
            try refill()
        }
    }

    mutating func bytes(_ count: Int) throws(NBDSocketFailure) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var failure: NBDSocketFailure?
        out.withUnsafeMutableBytes { buf in
            do throws(NBDSocketFailure) { try read(into: buf) } catch { failure = error }
        }
        if let failure { throw failure }
        return out
    }

    private mutating func refill() throws(NBDSocketFailure) {
        start = 0
        end = 0
        guard let base = storage.baseAddress else { return }
        while true {
            let n = recv(fd, base, storage.count, Int32(MSG_DONTWAIT))
            if n > 0 {
                end = n
                return
            }
            if n == 0 { throw .closed }
            let err = errno
            if err == EINTR { continue }
            if err == EAGAIN || err == EWOULDBLOCK {
                try wait()
                continue
            }
            throw .failed(call: "recv", errno: err)
        }
    }
}
