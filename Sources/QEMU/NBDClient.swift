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
        isReadOnly = result.flags & NBDTransmissionFlag.readOnly != 0
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
        guard contextIDs[NBDAllocation.contextName] != nil else {
            return [Extent(offset: range.lowerBound, length: upper - range.lowerBound, kind: .data)]
        }
        return try blockStatus(context: NBDAllocation.contextName, in: range).map { entry in
            let kind: ExtentKind
            switch entry.flags & (NBDAllocation.hole | NBDAllocation.zero) {
            case NBDAllocation.hole | NBDAllocation.zero: kind = .unallocated
            case NBDAllocation.zero: kind = .zero
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
        for entry in try blockStatus(context: context, in: range ?? 0..<size) where entry.flags & NBDDirtyBitmap.dirty != 0 {
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
        if context.hasPrefix(NBDDirtyBitmap.contextPrefix) {
            hint = "export the bitmap with the NBD export (block-export-add ... bitmaps: [\"\(context.dropFirst(NBDDirtyBitmap.contextPrefix.count))\"]) and ask for the context when connecting"
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
