// An NBD client as a BlockSource: reads a running VM's disk (or a bitmap of what changed) from
// qemu-nbd, qemu-storage-daemon, nbdkit or our own server. docs/NBD-CLIENT.md describes it.
import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Where an NBD server listens.
public enum NBDEndpoint: Sendable, CustomStringConvertible {
    case unix(String)
    case tcp(host: String, port: Int)

    public var description: String {
        switch self {
        case .unix(let path): "unix:\(path)"
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        }
    }
}

/// One connection to one NBD export, usable from many threads at once.
///
/// Requests are pipelined: callers register their requests, send them under a writer lock and
/// sleep until a single reader thread has routed every reply chunk (by cookie) into their
/// memory. A read longer than the server's maximum becomes several requests in flight together.
/// A broken connection (server gone, protocol violation, no reply within the timeout) fails
/// every waiting request at once; the client is then unusable and later calls fail at once.
public final class NBDClient: BlockSource, @unchecked Sendable {
    // @unchecked: all `let`s are immutable after `connect`; the mutable state lives in
    // `NBDConnection`, which guards it with its own lock.
    public let size: UInt64
    public let exportName: String
    /// The meta contexts the server agreed to, in the order asked for.
    public let contexts: [String]
    public let isReadOnly: Bool
    public let endpoint: NBDEndpoint

    /// Whether the server sends structured replies (else simple replies; no meta contexts).
    let usesStructuredReplies: Bool
    /// Whether NBD_OPT_GO was used (else NBD_OPT_EXPORT_NAME).
    let usedGo: Bool
    let limits: NBDBlockLimits
    private let contextIDs: [String: UInt32]
    private let connection: NBDConnection

    /// e.g. "nbd+unix:///EXPORT?socket=PATH" or "nbd://HOST:PORT/EXPORT" (for messages).
    public var name: String { Self.uri(endpoint, exportName) }

    /// Sum of the lengths of all NBD_CMD_READ requests sent so far.
    public var bytesRequested: UInt64 { connection.bytesRequested }

    /// The most requests this client had in flight at once (tests check pipelining with it).
    var peakRequestsInFlight: Int { connection.peakInFlight }

    /// Fixed newstyle handshake, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT for `metaContexts`
    /// (those the server does not know are simply not negotiated), NBD_OPT_GO with NBD_INFO_BLOCK_SIZE.
    /// Falls back to NBD_OPT_EXPORT_NAME if GO is unsupported. Timeouts on every step.
    ///
    /// `timeout` bounds the whole handshake (including waiting for a unix socket to appear or a
    /// server to accept) and, afterwards, how long requests may wait without the server sending
    /// anything.
    public static func connect(_ endpoint: NBDEndpoint, export: String, metaContexts: [String] = ["base:allocation"],
                               timeout: Double = 30) throws -> NBDClient {
        let name = uri(endpoint, export)
        guard export.utf8.count <= NBDWire.maxString else {
            throw CairnError(.usage, "the export name is longer than \(NBDWire.maxString) bytes", path: name)
        }
        guard metaContexts.count <= 256 else {
            throw CairnError(.usage, "\(metaContexts.count) meta contexts asked for (at most 256)", path: name)
        }
        let deadline = nbdNow() + timeout
        let fd = try NBDSocket.connect(endpoint, deadline: deadline, name: name)
        let result: NBDNegotiated
        do {
            var negotiator = NBDNegotiator(fd: fd, export: export, endpoint: endpoint, name: name, deadline: deadline)
            result = try negotiator.run(metaContexts: metaContexts.filter { $0.utf8.count <= NBDWire.maxString })
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
        let connection = NBDConnection(fd: fd, structured: result.structured, timeout: timeout,
                                       contextIDs: Set(result.contexts.map(\.id)))
        connection.start()
        return NBDClient(endpoint: endpoint, export: export, result: result, connection: connection)
    }

    private init(endpoint: NBDEndpoint, export: String, result: NBDNegotiated, connection: NBDConnection) {
        self.endpoint = endpoint
        exportName = export
        size = result.size
        isReadOnly = result.flags & NBDWire.transmissionReadOnly != 0
        contexts = result.contexts.map(\.name)
        contextIDs = Dictionary(result.contexts.map { ($0.name, $0.id) }, uniquingKeysWith: { a, _ in a })
        usesStructuredReplies = result.structured
        usedGo = result.usedGo
        limits = result.limits
        self.connection = connection
    }

    deinit { connection.close() }

    /// Sends NBD_CMD_DISC and closes the socket. Idempotent; requests still waiting fail.
    public func close() { connection.close() }

    // MARK: - Reads

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        guard buffer.count > 0 else { return }
        let end = offset + UInt64(buffer.count)
        let align = UInt64(limits.minimum)
        if align > 1 && (offset % align != 0 || (end % align != 0 && end != size)) {
            // The server wants aligned requests: read the aligned cover and copy out of it.
            let start = offset / align * align
            let stop = Self.roundUp(end, align, limit: size)
            let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(stop - start), alignment: 64)
            defer { bounce.deallocate() }
            try readAligned(into: bounce, at: start)
            let skip = Int(offset - start)
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce[skip..<skip + buffer.count]))
            return
        }
        try readAligned(into: buffer, at: offset)
    }

    private func readAligned(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let piece = Int(limits.readLimit)
        var requests: [NBDClientRequest] = []
        requests.reserveCapacity(buffer.count / piece + 1)
        var done = 0
        while done < buffer.count {
            let n = min(piece, buffer.count - done)
            requests.append(NBDClientRequest(read: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n]),
                                             offset: offset + UInt64(done)))
            done += n
        }
        connection.perform(requests)
        for r in requests {
            if let failure = r.failure { throw error(failure, command: "read", offset: r.offset, length: UInt64(r.length)) }
        }
    }

    // MARK: - Block status

    public func extents(in range: Range<UInt64>) throws -> [Extent] {
        let upper = min(range.upperBound, size)
        guard range.lowerBound < upper else { return [] }
        guard contextIDs[NBDWire.baseAllocation] != nil else {
            return [Extent(offset: range.lowerBound, length: upper - range.lowerBound, kind: .data)]
        }
        return try blockStatus(context: NBDWire.baseAllocation, in: range).map { entry in
            let kind: ExtentKind
            switch entry.flags & (NBDWire.stateHole | NBDWire.stateZero) {
            case NBDWire.stateHole | NBDWire.stateZero: kind = .unallocated
            case NBDWire.stateZero: kind = .zero
            default: kind = .data
            }
            return Extent(offset: entry.range.lowerBound, length: UInt64(entry.range.count), kind: kind)
        }.coalesced()
    }

    /// Raw block status of one negotiated context over `range` (loops until the range is covered).
    /// Neighbours with equal flags are merged; the result covers `range` (clamped to `size`) exactly.
    public func blockStatus(context: String, in range: Range<UInt64>) throws -> [(range: Range<UInt64>, flags: UInt32)] {
        guard let id = contextIDs[context] else { throw notNegotiated(context) }
        let upper = min(range.upperBound, size)
        var at = range.lowerBound
        var out: [(range: Range<UInt64>, flags: UInt32)] = []
        let align = UInt64(limits.minimum)
        let limit = limits.statusRequestLimit
        while at < upper {
            let start = at / align * align
            let wanted = upper - start > limit ? start + limit : upper
            let stop = Self.roundUp(wanted, align, limit: size)
            let request = NBDClientRequest(blockStatusAt: start, length: UInt32(stop - start))
            connection.perform([request])
            if let failure = request.failure {
                throw error(failure, command: "block status (\(context))", offset: start, length: stop - start)
            }
            guard let descriptors = request.statuses[id] else {
                throw error(.connection("protocol violation by the server: no BLOCK_STATUS chunk for context \(context)"),
                            command: "block status (\(context))", offset: start, length: stop - start)
            }
            var pos = start
            for d in descriptors where pos < stop {
                let next = pos + min(UInt64(d.length), stop - pos)  // a server may overshoot the request: clamp
                let lo = max(pos, at), hi = min(next, upper)
                if lo < hi {
                    if let last = out.last, last.flags == d.flags, last.range.upperBound == lo {
                        out[out.count - 1].range = last.range.lowerBound..<hi
                    } else {
                        out.append((lo..<hi, d.flags))
                    }
                }
                pos = next
            }
            guard pos > at else {
                throw error(.connection("protocol violation by the server: block status made no progress past offset \(at)"),
                            command: "block status (\(context))", offset: start, length: stop - start)
            }
            at = pos
        }
        return out
    }

    /// Ranges a `qemu:dirty-bitmap:NAME` context marks dirty (flag 1), ascending and merged. Throws if not negotiated.
    public func dirtyRanges(context: String, in range: Range<UInt64>? = nil) throws -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for entry in try blockStatus(context: context, in: range ?? 0..<size) where entry.flags & NBDWire.stateDirty != 0 {
            if let last = out.last, last.upperBound == entry.range.lowerBound {
                out[out.count - 1] = last.lowerBound..<entry.range.upperBound
            } else {
                out.append(entry.range)
            }
        }
        return out
    }

    // MARK: - Errors

    private func notNegotiated(_ context: String) -> CairnError {
        let have = contexts.isEmpty ? "none" : contexts.joined(separator: ", ")
        var hint = "ask for it in NBDClient.connect(metaContexts:)"
        if context.hasPrefix("qemu:dirty-bitmap:") {
            hint = "export the bitmap with the NBD export (block-export-add ... bitmaps: [\"\(context.dropFirst("qemu:dirty-bitmap:".count))\"]) and ask for the context when connecting"
        } else if !usesStructuredReplies {
            hint = "the server refused structured replies, so it offers no meta contexts"
        }
        return CairnError(.unsupported, "meta context \(context) was not negotiated with export \"\(exportName)\" (negotiated: \(have))",
                          path: name, hint: hint)
    }

    private func error(_ failure: NBDRequestFailure, command: String, offset: UInt64, length: UInt64) -> CairnError {
        let what = "NBD \(command) of \(length) bytes at offset \(offset) of export \"\(exportName)\""
        switch failure {
        case .server(let code, let message, let at):
            let detail = message.isEmpty ? "" : ": \(String(message.prefix(500)))"
            return CairnError(code == 95 ? .unsupported : .io, "\(what) failed on the server: \(NBDWire.errorText(code))\(detail)",
                              path: name, offset: at ?? offset, hint: Self.hint(code))
        case .connection(let reason):
            return CairnError(.io, "\(what) failed: \(reason)", path: name, offset: offset,
                              hint: "the NBD server at \(endpoint) stopped, dropped the connection or misbehaved; check that it still runs and connect again")
        }
    }

    private static func hint(_ code: UInt32) -> String {
        switch code {
        case 1: "the server does not allow this operation on the export"
        case 5: "the server could not read its disk; see the server's log and check the image"
        case 12: "the server is out of memory"
        case 22: "the server found the request invalid (out of range or misaligned); this is a bug in Cairn or the server"
        case 28: "the server's storage is full"
        case 75: "the request was too large for the server"
        case 95: "the server does not support this request on the export"
        case 108: "the server is shutting down; connect again once it is back"
        default: "see the server's log"
        }
    }

    /// `value` rounded up to a multiple of `align`, but at most `limit` (no overflow near 2^64).
    static func roundUp(_ value: UInt64, _ align: UInt64, limit: UInt64) -> UInt64 {
        let down = value / align * align
        guard down < value else { return min(value, limit) }
        return limit - down <= align ? limit : down + align
    }

    static func uri(_ endpoint: NBDEndpoint, _ export: String) -> String {
        switch endpoint {
        case .unix(let path): "nbd+unix:///\(export)?socket=\(path)"
        case .tcp: "nbd://\(endpoint)/\(export)"
        }
    }
}

// MARK: - Handshake

/// What the handshake agreed.
struct NBDNegotiated {
    var size: UInt64 = 0
    var flags: UInt16 = 0
    var structured = false
    var usedGo = false
    var contexts: [(name: String, id: UInt32)] = []
    var limits = NBDBlockLimits()
}

/// The option haggling on a fresh socket, before the reader thread exists.
struct NBDNegotiator {
    let fd: Int32
    let export: String
    let endpoint: NBDEndpoint
    let name: String
    let deadline: Double

    mutating func run(metaContexts: [String]) throws -> NBDNegotiated {
        var r = NBDByteReader(try receive(16, "the greeting"))
        guard r.u64() == NBDWire.initPassword else {
            throw fail("the server did not greet with NBDMAGIC; it is not an NBD server", code: .io)
        }
        let second = r.u64() ?? 0
        if second == NBDWire.oldstyleMagic {
            throw CairnError(.unsupported, "the NBD server at \(endpoint) uses oldstyle negotiation, which Cairn does not speak",
                             path: name, hint: "run the server in newstyle mode (qemu-nbd and nbdkit do so by default)")
        }
        guard second == NBDWire.optionMagic else {
            throw fail("the greeting's second word is 0x\(String(second, radix: 16)), not IHAVEOPT", code: .io)
        }
        var fr = NBDByteReader(try receive(2, "the handshake flags"))
        let handshake = fr.u16() ?? 0
        let fixed = handshake & NBDWire.flagFixedNewstyle != 0
        let noZeroes = handshake & NBDWire.flagNoZeroes != 0
        var clientFlags: [UInt8] = []
        clientFlags.appendBE((fixed ? NBDWire.clientFixedNewstyle : 0) | (noZeroes ? NBDWire.clientNoZeroes : 0))
        try send(clientFlags, "the client flags")

        var result = NBDNegotiated()
        guard fixed else {
            // Plain newstyle: NBD_OPT_EXPORT_NAME is the only option there is.
            try exportName(into: &result, noZeroes: noZeroes)
            return result
        }
        result.structured = try simpleOption(NBDWire.optStructuredReply, "NBD_OPT_STRUCTURED_REPLY")
        if result.structured && !metaContexts.isEmpty {
            result.contexts = try setMetaContexts(metaContexts)
        }
        if try go(into: &result) { return result }
        try exportName(into: &result, noZeroes: noZeroes)
        return result
    }

    /// An option without data whose answer is ACK or an error; true on ACK.
    private func simpleOption(_ option: UInt32, _ label: String) throws -> Bool {
        try send(NBDEncode.option(option), label)
        while true {
            let (header, _) = try optionReply(option, label)
            if header.type == NBDWire.repAck { return true }
            if header.isError {
                if header.type == NBDWire.repErrTLSRequired { throw tlsRequired() }
                return false
            }
            // Informational replies the client does not expect are skipped.
        }
    }

    private func setMetaContexts(_ wanted: [String]) throws -> [(name: String, id: UInt32)] {
        var queries: [String] = []
        for q in wanted where !queries.contains(q) { queries.append(q) }
        try send(NBDEncode.option(NBDWire.optSetMetaContext, NBDEncode.metaContextData(export: export, queries: queries)),
                 "NBD_OPT_SET_META_CONTEXT")
        var found: [String: UInt32] = [:]
        while true {
            let (header, payload) = try optionReply(NBDWire.optSetMetaContext, "NBD_OPT_SET_META_CONTEXT")
            if header.type == NBDWire.repMetaContext {
                var r = NBDByteReader(payload)
                guard let id = r.u32(), let context = r.string(r.remaining) else {
                    throw fail("an NBD_REP_META_CONTEXT reply of \(payload.count) bytes", code: .io)
                }
                if queries.contains(context), found[context] == nil, !found.values.contains(id) { found[context] = id }
                continue
            }
            if header.type == NBDWire.repAck { break }
            if header.isError {
                if header.type == NBDWire.repErrTLSRequired { throw tlsRequired() }
                return []  // the server knows none of them (or the option): nothing negotiated
            }
        }
        return queries.compactMap { q in found[q].map { (q, $0) } }
    }

    /// NBD_OPT_GO; false when the server does not know it (then EXPORT_NAME is used).
    private func go(into result: inout NBDNegotiated) throws -> Bool {
        try send(NBDEncode.option(NBDWire.optGo, NBDEncode.goData(export: export, items: [NBDWire.infoBlockSize])), "NBD_OPT_GO")
        var haveExport = false
        while true {
            let (header, payload) = try optionReply(NBDWire.optGo, "NBD_OPT_GO")
            switch header.type {
            case NBDWire.repInfo:
                switch NBDInfoItem.decode(payload) {
                case .failure(let v): throw fail(v.message, code: .io)
                case .success(.export(let size, let flags)):
                    result.size = size
                    result.flags = flags
                    haveExport = true
                case .success(.blockSize(let minimum, let preferred, let maximum)):
                    result.limits = NBDBlockLimits(minimum: minimum, preferred: preferred, maximum: maximum)
                case .success(.other):
                    break
                }
            case NBDWire.repAck:
                guard haveExport else { throw fail("NBD_OPT_GO succeeded without NBD_INFO_EXPORT (no size)", code: .io) }
                result.usedGo = true
                return true
            case NBDWire.repErrUnsupported:
                return false
            case NBDWire.repErrUnknown:
                throw unknownExport(message: text(payload))
            case NBDWire.repErrTLSRequired:
                throw tlsRequired()
            default:
                if header.isError {
                    let message = text(payload)
                    throw CairnError(.io, "the NBD server at \(endpoint) refused export \"\(export)\": \(NBDWire.optionReplyName(header.type))"
                                     + (message.isEmpty ? "" : ": \(message)"), path: name,
                                     hint: header.type == NBDWire.repErrShutdown ? "the server is shutting down; connect again later" : "see the server's log")
                }
                // Other informational replies are skipped.
            }
        }
    }

    private func exportName(into result: inout NBDNegotiated, noZeroes: Bool) throws {
        try send(NBDEncode.option(NBDWire.optExportName, Array(export.utf8)), "NBD_OPT_EXPORT_NAME")
        let reply: [UInt8]
        do {
            reply = try receive(noZeroes ? 10 : 134, "the reply to NBD_OPT_EXPORT_NAME")
        } catch let e as CairnError where e.message.contains("closed the connection") {
            // The option cannot report errors: a server without the export just hangs up.
            throw CairnError(.notFound, "the NBD server at \(endpoint) closed the connection when asked for export \"\(export)\"",
                             path: name, hint: "the export probably does not exist; check its name (qemu-nbd -x, nbdkit -e)")
        }
        var r = NBDByteReader(reply)
        result.size = r.u64() ?? 0
        result.flags = r.u16() ?? 0
        result.usedGo = false
    }

    private func unknownExport(message: String) -> CairnError {
        var hint = "check the export name"
        if let names = try? listExports(), !names.isEmpty {
            hint += "; the server offers: " + names.prefix(20).map { "\"\($0)\"" }.joined(separator: ", ")
        }
        try? send(NBDEncode.option(NBDWire.optAbort), "NBD_OPT_ABORT")
        return CairnError(.notFound, "the NBD server at \(endpoint) has no export \"\(export)\"" + (message.isEmpty ? "" : " (\(message))"),
                          path: name, hint: hint)
    }

    private func listExports() throws -> [String] {
        try send(NBDEncode.option(NBDWire.optList), "NBD_OPT_LIST")
        var names: [String] = []
        while true {
            let (header, payload) = try optionReply(NBDWire.optList, "NBD_OPT_LIST")
            if header.type == NBDWire.repServer {
                var r = NBDByteReader(payload)
                if let n = r.u32(), let s = r.string(Int(min(n, UInt32(NBDWire.maxString)))) { names.append(s) }
                continue
            }
            return names  // ACK or an error ends the list
        }
    }

    private func tlsRequired() -> CairnError {
        CairnError(.unsupported, "the NBD server at \(endpoint) requires TLS, which Cairn's NBD client does not speak", path: name,
                   hint: "export the disk without TLS on a unix socket or a trusted network")
    }

    private func optionReply(_ option: UInt32, _ label: String) throws -> (NBDOptionReplyHeader, [UInt8]) {
        let head = try receive(NBDWire.optionReplyHeaderSize, "the reply to \(label)")
        switch NBDOptionReplyHeader.decode(head, expecting: option) {
        case .failure(let v):
            throw fail("\(v.message) (in the reply to \(label))", code: .io)
        case .success(let header):
            let payload = header.length == 0 ? [] : try receive(Int(header.length), "the reply to \(label)")
            return (header, payload)
        }
    }

    private func text(_ payload: [UInt8]) -> String {
        String(decoding: payload.prefix(500), as: UTF8.self)
    }

    private func fail(_ message: String, code: CairnError.Code) -> CairnError {
        CairnError(code, "NBD handshake with \(endpoint) for export \"\(export)\" failed: \(message)", path: name,
                   hint: "check that the endpoint is an NBD server (qemu-nbd, qemu-storage-daemon, nbdkit)")
    }

    private func send(_ bytes: [UInt8], _ label: String) throws {
        let failure = bytes.withUnsafeBytes { NBDSocket.send(fd, $0, deadline: deadline) }
        if let failure { throw fail("sending \(label): \(failure.reason)", code: .io) }
    }

    private func receive(_ count: Int, _ label: String) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let fd = self.fd, deadline = self.deadline
        var failure: NBDSocketFailure?
        out.withUnsafeMutableBytes { buf in
            do throws(NBDSocketFailure) {
                try NBDSocket.receive(fd, into: buf) { () throws(NBDSocketFailure) in
                    if !NBDSocket.waitFor(fd, events: Int16(POLLIN), until: deadline) {
                        throw .timedOut("no answer within the connect timeout")
                    }
                }
            } catch {
                failure = error
            }
        }
        if let failure { throw fail("waiting for \(label): \(failure.reason)", code: .io) }
        return out
    }
}

// MARK: - Transmission

/// Why a request failed.
enum NBDRequestFailure: Equatable, Sendable {
    /// The server answered with an error.
    case server(code: UInt32, message: String, offset: UInt64?)
    /// The connection broke (or was closed) before the reply was complete.
    case connection(String)
}

/// One request in flight. The reader thread owns its reply state until `isDone`; the caller
/// looks at it only afterwards (both under the connection's lock, which orders the accesses).
final class NBDClientRequest: @unchecked Sendable {
    let type: UInt16
    let offset: UInt64
    let length: UInt32
    /// Where a READ's bytes go (nil for BLOCK_STATUS).
    let buffer: UnsafeMutableRawBufferPointer?
    var cookie: UInt64 = 0
    // Written by the reader while in flight.
    var assembly: NBDReadAssembly
    var statuses: [UInt32: [NBDDescriptor]] = [:]
    var serverError: NBDRequestFailure?
    // Guarded by the connection's lock.
    var isDone = false
    var failure: NBDRequestFailure?

    init(read buffer: UnsafeMutableRawBufferPointer, offset: UInt64) {
        type = NBDWire.cmdRead
        self.offset = offset
        length = UInt32(buffer.count)
        self.buffer = buffer
        assembly = NBDReadAssembly(offset: offset, length: UInt64(buffer.count))
    }

    init(blockStatusAt offset: UInt64, length: UInt32) {
        type = NBDWire.cmdBlockStatus
        self.offset = offset
        self.length = length
        buffer = nil
        assembly = NBDReadAssembly(offset: offset, length: UInt64(length))
    }
}

/// The socket in the transmission phase: a writer lock for sending, one reader thread that
/// routes replies to waiting requests by cookie.
final class NBDConnection: @unchecked Sendable {
    // @unchecked: mutable state is guarded by `cond` (see each field); the socket is written
    // under `writeLock` and read only by the reader thread.
    private let fd: Int32
    private let structured: Bool
    private let timeout: Double
    private let contextIDs: Set<UInt32>
    private let cond = NSCondition()
    private let writeLock = NSLock()

    // Guarded by `cond`.
    private var pending: [UInt64: NBDClientRequest] = [:]
    private var nextCookie: UInt64 = 1
    /// Set once: why the connection can no longer be used.
    private var brokenReason: String?
    private var closed = false
    private var readerFinished = false
    private var busySince = 0.0
    private var sentReadBytes: UInt64 = 0
    private var peak = 0
    // Guarded by `writeLock`.
    private var socketClosed = false

    init(fd: Int32, structured: Bool, timeout: Double, contextIDs: Set<UInt32>) {
        self.fd = fd
        self.structured = structured
        self.timeout = max(0.1, timeout)
        self.contextIDs = contextIDs
    }

    var bytesRequested: UInt64 {
        cond.lock()
        defer { cond.unlock() }
        return sentReadBytes
    }

    var peakInFlight: Int {
        cond.lock()
        defer { cond.unlock() }
        return peak
    }

    func start() {
        let thread = Thread { [self] in self.readLoop() }
        thread.name = "cairn-nbd-reader"
        thread.start()
    }

    /// Sends `requests` back to back and waits until every one is answered or failed.
    /// Never throws: each request carries its own `failure`.
    func perform(_ requests: [NBDClientRequest]) {
        cond.lock()
        if let reason = brokenReason {
            for r in requests {
                r.failure = .connection("the connection is no longer usable (\(reason))")
                r.isDone = true
            }
            cond.unlock()
            return
        }
        if pending.isEmpty { busySince = nbdNow() }
        var header: [UInt8] = []
        header.reserveCapacity(requests.count * NBDWire.requestHeaderSize)
        var readBytes: UInt64 = 0
        for r in requests {
            r.cookie = nextCookie
            nextCookie &+= 1
            pending[r.cookie] = r
            NBDEncode.request(into: &header, type: r.type, cookie: r.cookie, offset: r.offset, length: r.length)
            if r.type == NBDWire.cmdRead { readBytes += UInt64(r.length) }
        }
        peak = max(peak, pending.count)
        cond.unlock()

        writeLock.lock()
        let failure: NBDSocketFailure? = socketClosed ? .closed
            : header.withUnsafeBytes { NBDSocket.send(fd, $0, deadline: nbdNow() + timeout) }
        if let failure {
            // Requests may be half sent: the stream is unusable. The reader fails every request.
            cond.lock()
            if brokenReason == nil { brokenReason = "sending a request: \(failure.reason)" }
            cond.unlock()
            if !socketClosed { _ = shutdown(fd, Int32(SHUT_RDWR)) }
        }
        writeLock.unlock()

        cond.lock()
        if failure == nil { sentReadBytes += readBytes }
        while !requests.allSatisfy(\.isDone) { cond.wait() }
        cond.unlock()
    }

    /// NBD_CMD_DISC, then the socket is shut down and closed once the reader has stopped.
    func close() {
        cond.lock()
        if closed {
            cond.unlock()
            return
        }
        closed = true
        // A soft disconnect whenever the stream is intact (also after ESHUTDOWN, as the protocol asks).
        let healthy = !readerFinished
        if brokenReason == nil { brokenReason = "closed by Cairn" }
        cond.unlock()

        writeLock.lock()
        if healthy {
            var disc: [UInt8] = []
            NBDEncode.request(into: &disc, type: NBDWire.cmdDisconnect, cookie: 0, offset: 0, length: 0)
            _ = disc.withUnsafeBytes { NBDSocket.send(fd, $0, deadline: nbdNow() + min(timeout, 2)) }
        }
        _ = shutdown(fd, Int32(SHUT_RDWR))
        writeLock.unlock()

        cond.lock()
        let deadline = Date().addingTimeInterval(5)
        while !readerFinished && cond.wait(until: deadline) {}
        let finished = readerFinished
        cond.unlock()
        // Close only once the reader is out of recv(), so the number cannot be reused under it.
        if finished {
            writeLock.lock()
            socketClosed = true
            _ = Glibc.close(fd)
            writeLock.unlock()
        }
    }

    // MARK: Reader

    private func readLoop() {
        let fd = self.fd
        var receiver = NBDReceiver(fd: fd) { () throws(NBDSocketFailure) in
            // Called when everything received so far is consumed: the server last sent
            // something just now. Wait in slices so that a silent server is noticed.
            let entered = nbdNow()
            while true {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let rc = poll(&p, 1, 250)
                if rc > 0 || (rc < 0 && errno != EINTR) { return }
                let (busy, since) = self.busyState()
                if busy, nbdNow() - max(since, entered) > self.timeout {
                    throw .timedOut("no reply from the server within \(QMPClient.seconds(self.timeout))")
                }
            }
        }
        var reason: NBDSocketFailure
        do throws(NBDSocketFailure) {
            while true { try readReply(&receiver) }
        } catch {
            reason = error
        }
        cond.lock()
        let message: String
        if let existing = brokenReason {
            message = existing
        } else {
            message = reason.reason
            brokenReason = message
        }
        let waiting = pending.values
        pending.removeAll()
        for r in waiting {
            r.failure = .connection(message)
            r.isDone = true
        }
        readerFinished = true
        cond.broadcast()
        cond.unlock()
        // A violation leaves the stream in an unknown state: hang up (the protocol allows it).
        writeLock.lock()
        if !socketClosed { _ = shutdown(fd, Int32(SHUT_RDWR)) }
        writeLock.unlock()
    }

    private func busyState() -> (Bool, Double) {
        cond.lock()
        defer { cond.unlock() }
        return (!pending.isEmpty, busySince)
    }

    private func request(_ cookie: UInt64) throws(NBDSocketFailure) -> NBDClientRequest {
        cond.lock()
        let r = pending[cookie]
        cond.unlock()
        guard let r else { throw .violation("a reply for cookie \(cookie), which no request is waiting for") }
        return r
    }

    /// Ends `r`: checks that a successful read got every byte, wakes its caller.
    private func finish(_ r: NBDClientRequest) throws(NBDSocketFailure) {
        if r.serverError == nil, r.type == NBDWire.cmdRead, !r.assembly.isComplete {
            throw .violation("the reply to a read of \(r.length) bytes at offset \(r.offset) ended after \(r.assembly.deliveredBytes) bytes")
        }
        cond.lock()
        pending.removeValue(forKey: r.cookie)
        r.failure = r.serverError
        r.isDone = true
        if case .server(let code, _, _) = r.serverError, code == NBDWire.errShutdown, brokenReason == nil {
            brokenReason = "the server is shutting down (ESHUTDOWN)"
        }
        cond.broadcast()
        cond.unlock()
    }

    private func readReply(_ rx: inout NBDReceiver) throws(NBDSocketFailure) {
        var head = try rx.bytes(NBDWire.simpleHeaderSize)
        var decoded = NBDReplyHeader.decode(head)
        if case .success(.needMore) = decoded {
            head += try rx.bytes(NBDWire.chunkHeaderSize - NBDWire.simpleHeaderSize)
            decoded = NBDReplyHeader.decode(head)
        }
        let header: NBDReplyHeader
        switch decoded {
        case .failure(let v): throw .violation(v.message)
        case .success(let h): header = h
        }
        switch header {
        case .needMore:
            throw .violation("an incomplete reply header")
        case .simple(let error, let cookie):
            let r = try request(cookie)
            if error != 0 {
                r.serverError = .server(code: error, message: "", offset: nil)
            } else if r.type == NBDWire.cmdRead, let buffer = r.buffer {
                guard !structured else { throw .violation("a simple reply with data to a read after structured replies were agreed") }
                try rx.read(into: buffer)
                _ = r.assembly.claim(r.offset, count: UInt64(r.length))
            } else {
                throw .violation("a simple reply without data to a block status request")
            }
            try finish(r)
        case .chunk(let flags, let type, let cookie, let length):
            guard structured else { throw .violation("a structured reply chunk though structured replies were not agreed") }
            let r = try request(cookie)
            if type == NBDWire.chunkNone, flags & NBDWire.replyFlagDone == 0 {
                throw .violation("an NBD_REPLY_TYPE_NONE chunk without the DONE flag")
            }
            try chunk(type: type, length: length, for: r, &rx)
            if flags & NBDWire.replyFlagDone != 0 { try finish(r) }
        }
    }

    private func chunk(type: UInt16, length: UInt32, for r: NBDClientRequest, _ rx: inout NBDReceiver) throws(NBDSocketFailure) {
        if type == NBDWire.chunkOffsetData {
            guard r.type == NBDWire.cmdRead, let buffer = r.buffer else { throw .violation("an OFFSET_DATA chunk in the reply to block status") }
            guard length > 8 else { throw .violation("an OFFSET_DATA chunk of \(length) bytes (at least 9 expected)") }
            var o = NBDByteReader(try rx.bytes(8))
            let start = o.u64() ?? 0
            switch r.assembly.claim(start, count: UInt64(length) - 8) {
            case .failure(let v): throw .violation(v.message)
            case .success(let at): try rx.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + Int(length - 8)]))
            }
            return
        }
        let limit: UInt32 = switch type {
        case NBDWire.chunkNone: 0
        case NBDWire.chunkOffsetHole: 12
        case NBDWire.chunkBlockStatus: NBDWire.maxBlockStatusPayload
        default: NBDWire.maxErrorPayload
        }
        guard length <= limit else { throw .violation("a chunk of type \(type) with \(length) bytes of payload (at most \(limit) expected)") }
        let payload = try rx.bytes(Int(length))
        switch NBDChunkPayload.decode(type: type, payload) {
        case .failure(let v):
            throw .violation(v.message)
        case .success(.none):
            break
        case .success(.hole(let offset, let count)):
            guard r.type == NBDWire.cmdRead, let buffer = r.buffer else { throw .violation("an OFFSET_HOLE chunk in the reply to block status") }
            switch r.assembly.claim(offset, count: UInt64(count)) {
            case .failure(let v): throw .violation(v.message)
            case .success(let at): UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + Int(count)]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        case .success(.blockStatus(let context, let descriptors)):
            guard r.type == NBDWire.cmdBlockStatus else { throw .violation("a BLOCK_STATUS chunk in the reply to a read") }
            guard contextIDs.contains(context) else { throw .violation("a BLOCK_STATUS chunk for context id \(context), which was not negotiated") }
            guard r.statuses[context] == nil else { throw .violation("two BLOCK_STATUS chunks for context id \(context) in one reply") }
            r.statuses[context] = descriptors
        case .success(.error(let code, let message, let offset)):
            if r.serverError == nil { r.serverError = .server(code: code, message: message, offset: offset) }
        }
    }
}
