// Helpers of the NBD client tests: server processes, map comparisons, and a scripted server
// for what real servers never do.
import CairnCore
import CairnTestSupport
import Foundation
import Testing
@testable import QEMU
#if canImport(NBDServer)
import NBDServer
#endif
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Helpers

let mib = 1 << 20

/// A server process (qemu-nbd, nbdkit) on a unix socket, killed with SIGKILL by `stop()`.
final class ServerProcess: @unchecked Sendable {
    // @unchecked: used from the test's thread (and `stop` from one helper thread).
    let tool: BackgroundTool
    let socket: String

    init(_ dir: TempDir, _ name: String, _ arguments: [String], socket: String) throws {
        self.socket = socket
        tool = try BackgroundTool(name, arguments, in: dir)
    }

    /// nbdkit in the foreground on `dir/nbdkit.sock`, exiting with the test process.
    static func nbdkit(_ dir: TempDir, _ arguments: [String]) throws -> ServerProcess {
        let socket = dir.file("nbdkit.sock")
        return try ServerProcess(dir, "nbdkit", ["-f", "--exit-with-parent", "-U", socket] + arguments, socket: socket)
    }

    /// qemu-nbd (read-only, several clients, stays up after a client leaves) on `dir/qemu-nbd.sock`.
    static func qemuNBD(_ dir: TempDir, format: String, image: String, export: String) throws -> ServerProcess {
        let socket = dir.file("qemu-nbd.sock")
        return try ServerProcess(dir, "qemu-nbd", ["-f", format, "-r", "-k", socket, "-x", export, "--persistent", "-e", "4", image], socket: socket)
    }

    var endpoint: NBDEndpoint { .unix(socket) }
    var stderr: String { tool.stderr }

    func stop() { tool.stop() }
}

/// Byte-wise equality without a per-element loop (debug builds compare arrays slowly).
func same(_ a: UnsafeRawBufferPointer, _ b: [UInt8], at offset: Int) -> Bool {
    guard offset >= 0, offset + a.count <= b.count else { return false }
    guard let pa = a.baseAddress, a.count > 0 else { return true }
    return b.withUnsafeBytes { memcmp(pa, $0.baseAddress! + offset, a.count) == 0 }
}

func same(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    a.count == b.count && a.withUnsafeBytes { same($0, b, at: 0) }
}

/// Reads `count` bytes at `offset` through the client into a buffer full of garbage (so holes
/// must be written as zeros) and compares them with `expected`.
func readMatches(_ c: NBDClient, _ expected: [UInt8], at offset: Int, count: Int) throws -> Bool {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 64)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
    try c.read(into: buffer, at: UInt64(offset))
    return same(UnsafeRawBufferPointer(buffer), expected, at: offset)
}

/// The map `qemu-img map --output=json` gives, in our terms: qemu's NBD server reports clusters
/// that read as zeros without data as HOLE|ZERO (unallocated), data+zero as ZERO only.
func qemuImgMap(_ image: String, format: String) throws -> [Extent] {
    let out = try Tool.run("qemu-img", ["map", "--output=json", "-f", format, image]).stdoutData
    let entries = try #require(try JSONSerialization.jsonObject(with: out) as? [[String: Any]])
    return try entries.map { e in
        let start = try #require((e["start"] as? NSNumber)?.uint64Value)
        let length = try #require((e["length"] as? NSNumber)?.uint64Value)
        let data = (e["data"] as? Bool) ?? true
        let zero = (e["zero"] as? Bool) ?? false
        let kind: ExtentKind = data ? (zero ? .zero : .data) : (zero ? .unallocated : .data)
        return Extent(offset: start, length: length, kind: kind)
    }.coalesced()
}

/// `nbdinfo --map` of an export: (offset, length, type bits), coalesced by type.
func nbdinfoMap(_ uri: String) throws -> [Extent] {
    var out: [Extent] = []
    for line in try Tool.run("nbdinfo", ["--map", uri]).stdout.split(separator: "\n") {
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        guard f.count >= 3, let o = UInt64(f[0]), let l = UInt64(f[1]), let t = UInt32(f[2]) else { continue }
        let kind: ExtentKind = t & 3 == 3 ? .unallocated : (t & 2 != 0 ? .zero : .data)
        out.append(Extent(offset: o, length: l, kind: kind))
    }
    return out.coalesced()
}

/// Extents of `map` clipped to `range`.
func clip(_ map: [Extent], _ range: Range<UInt64>) -> [Extent] {
    map.compactMap { e in
        let lo = max(e.offset, range.lowerBound), hi = min(e.end, range.upperBound)
        return lo < hi ? Extent(offset: lo, length: hi - lo, kind: e.kind) : nil
    }
}

/// Runs `body`, returning the CairnError it throws (recording an issue if it does not throw one).
func cairnError(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> CairnError? {
    do {
        try body()
        Issue.record("expected an error, got none", sourceLocation: sourceLocation)
    } catch let e as CairnError {
        return e
    } catch {
        Issue.record("expected a CairnError, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

func randomFile(_ path: String, size: Int, seed: UInt64) throws -> [UInt8] {
    var rng = SeededRandom(seed: seed)
    let bytes = rng.bytes(size)
    try writeBytes(bytes, to: path, at: 0)
    return bytes
}

// MARK: - A scripted NBD server for what real servers never do

/// Speaks just enough of the protocol to reach transmission, then answers each request with
/// whatever `respond` returns (nil: hang up). For malformed replies, fallbacks and timeouts.
final class FakeNBDServer: @unchecked Sendable {
    // @unchecked: the config and responder are immutable; `connections` is behind a lock.
    struct Request: Sendable, Equatable {
        var flags: UInt16
        var type: UInt16
        var cookie: UInt64
        var offset: UInt64
        var length: UInt32
    }

    struct Config: Sendable {
        var fixedNewstyle = true
        var structured = true
        var go = true
        var contexts: [String: UInt32] = ["base:allocation": 1]
        var size: UInt64 = 1 << 20
        var blockSize: (UInt32, UInt32, UInt32)?
    }

    typealias Responder = @Sendable (Request) -> [UInt8]?

    let socket: String
    let config: Config
    private let listener: Int32
    private let respond: Responder
    private let connections = Locked<[Int32]>([])
    let seen = Locked<[Request]>([])

    init(_ dir: TempDir, _ config: Config = Config(), respond: @escaping Responder = FakeNBDServer.good) throws {
        socket = dir.file("fake.sock")
        self.config = config
        self.respond = respond
        listener = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        let fd = listener
        let bound = try UnixSocketAddress(path: socket, what: "test NBD").bind(fd)
        guard bound == 0, listen(fd, 8) == 0 else { throw CairnError.errno("bind", errno, path: socket) }
        Thread { [self] in
            while true {
                let c = accept(fd, nil, nil)
                guard c >= 0 else { return }
                connections.withLock { $0.append(c) }
                Thread { [self] in self.serve(c) }.start()
            }
        }.start()
    }

    var endpoint: NBDEndpoint { .unix(socket) }

    func stop() {
        _ = shutdown(listener, Int32(SHUT_RDWR))
        _ = Glibc.close(listener)
        for c in connections.withLock({ $0 }) { _ = shutdown(c, Int32(SHUT_RDWR)) }
    }

    deinit { stop() }

    /// The data of the fake disk: a pattern that differs from byte to byte.
    static func byte(at offset: UInt64) -> UInt8 { UInt8(truncatingIfNeeded: offset &* 7 &+ offset >> 8) }
    static func bytes(_ offset: UInt64, _ count: Int) -> [UInt8] { (0..<count).map { byte(at: offset + UInt64($0)) } }

    static func chunk(_ cookie: UInt64, type: UInt16, done: Bool = false, flags: UInt16 = 0, _ payload: [UInt8]) -> [UInt8] {
        var b: [UInt8] = []
        b.appendBE(NBDMagic.structuredReply)
        b.appendBE(flags | (done ? NBDReplyType.flagDone : 0))
        b.appendBE(type)
        b.appendBE(cookie)
        b.appendBE(UInt32(payload.count))
        return b + payload
    }

    static func data(_ cookie: UInt64, at offset: UInt64, _ count: Int, done: Bool = false) -> [UInt8] {
        var p: [UInt8] = []
        p.appendBE(offset)
        return chunk(cookie, type: NBDReplyType.offsetData, done: done, p + bytes(offset, count))
    }

    static func hole(_ cookie: UInt64, at offset: UInt64, _ count: UInt32, done: Bool = false) -> [UInt8] {
        var p: [UInt8] = []
        p.appendBE(offset)
        p.appendBE(count)
        return chunk(cookie, type: NBDReplyType.offsetHole, done: done, p)
    }

    static func status(_ cookie: UInt64, context: UInt32, _ descriptors: [(UInt32, UInt32)], done: Bool = true) -> [UInt8] {
        var p: [UInt8] = []
        p.appendBE(context)
        for (l, f) in descriptors {
            p.appendBE(l)
            p.appendBE(f)
        }
        return chunk(cookie, type: NBDReplyType.blockStatus, done: done, p)
    }

    static func error(_ cookie: UInt64, code: UInt32, _ message: String, offset: UInt64? = nil, done: Bool = true) -> [UInt8] {
        var p: [UInt8] = []
        p.appendBE(code)
        p.appendBE(UInt16(message.utf8.count))
        p += Array(message.utf8)
        if let offset { p.appendBE(offset) }
        return chunk(cookie, type: offset == nil ? NBDReplyType.error : NBDReplyType.errorOffset, done: done, p)
    }

    static func simple(_ cookie: UInt64, error: UInt32 = 0, _ data: [UInt8] = []) -> [UInt8] {
        var b: [UInt8] = []
        b.appendBE(NBDMagic.simpleReply)
        b.appendBE(error)
        b.appendBE(cookie)
        return b + data
    }

    /// Correct answers: one data chunk per read, one all-data descriptor per context.
    static func good(_ r: Request) -> [UInt8]? {
        if r.type == NBDCommand.read { return data(r.cookie, at: r.offset, Int(r.length), done: true) }
        return status(r.cookie, context: 1, [(r.length, 0)])
    }

    // MARK: Serving one connection

    private func serve(_ c: Int32) {
        defer { _ = shutdown(c, Int32(SHUT_RDWR)) }
        func put(_ b: [UInt8]) { _ = b.withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }
        func take(_ n: Int) -> [UInt8]? {
            var b = [UInt8](repeating: 0, count: n)
            var done = 0
            while done < n {
                let k = b.withUnsafeMutableBytes { recv(c, $0.baseAddress! + done, n - done, 0) }
                if k <= 0 { return nil }
                done += k
            }
            return b
        }
        func reply(_ option: UInt32, _ type: UInt32, _ data: [UInt8] = []) {
            var b: [UInt8] = []
            b.appendBE(NBDMagic.optionReply)
            b.appendBE(option)
            b.appendBE(type)
            b.appendBE(UInt32(data.count))
            put(b + data)
        }
        var hello: [UInt8] = []
        hello.appendBE(NBDMagic.server)
        hello.appendBE(NBDMagic.option)
        hello.appendBE((config.fixedNewstyle ? NBDHandshakeFlag.fixedNewstyle : 0) | NBDHandshakeFlag.noZeroes)
        put(hello)
        guard let cf = take(4) else { return }
        let noZeroes = cf[3] & 2 != 0
        let exportFlags: UInt16 = 1 | NBDTransmissionFlag.readOnly
        negotiation: while true {
            guard let h = take(16) else { return }
            var r = NBDByteReader(h)
            _ = r.u64()
            let option = r.u32() ?? 0
            let length = Int(r.u32() ?? 0)
            guard let data = take(length) else { return }
            switch option {
            case NBDOption.exportName:
                guard data == Array("disk".utf8) else { return }  // the option cannot fail: hang up
                var b: [UInt8] = []
                b.appendBE(config.size)
                b.appendBE(exportFlags)
                if !noZeroes { b += [UInt8](repeating: 0, count: 124) }
                put(b)
                break negotiation
            case NBDOption.structuredReply where config.fixedNewstyle:
                reply(option, config.structured ? NBDOptionReply.ack : NBDOptionReply.errUnsupported)
            case NBDOption.setMetaContext where config.fixedNewstyle:
                var d = NBDByteReader(data)
                let nameLength = Int(d.u32() ?? 0)
                _ = d.bytes(nameLength)
                let count = Int(d.u32() ?? 0)
                for _ in 0..<count {
                    let l = Int(d.u32() ?? 0)
                    let q = d.string(l) ?? ""
                    if let id = config.contexts[q] {
                        var p: [UInt8] = []
                        p.appendBE(id)
                        reply(option, NBDOptionReply.metaContext, p + Array(q.utf8))
                    }
                }
                reply(option, NBDOptionReply.ack)
            case NBDOption.go where config.fixedNewstyle && config.go:
                var d = NBDByteReader(data)
                let name = d.string(Int(d.u32() ?? 0)) ?? ""
                guard name == "disk" else {
                    reply(option, NBDOptionReply.errUnknown, Array("no such export".utf8))
                    continue
                }
                var info: [UInt8] = []
                info.appendBE(NBDInfo.export)
                info.appendBE(config.size)
                info.appendBE(exportFlags)
                reply(option, NBDOptionReply.info, info)
                if let (a, b, m) = config.blockSize {
                    var bs: [UInt8] = []
                    bs.appendBE(NBDInfo.blockSize)
                    bs.appendBE(a)
                    bs.appendBE(b)
                    bs.appendBE(m)
                    reply(option, NBDOptionReply.info, bs)
                }
                reply(option, NBDOptionReply.ack)
                break negotiation
            case NBDOption.list where config.fixedNewstyle:
                var p: [UInt8] = []
                p.appendBE(UInt32(4))
                reply(option, NBDOptionReply.server, p + Array("disk".utf8))
                reply(option, NBDOptionReply.ack)
            case NBDOption.abort:
                reply(option, NBDOptionReply.ack)
                return
            default:
                guard config.fixedNewstyle else { return }
                reply(option, NBDOptionReply.errUnsupported)
            }
        }
        while let h = take(NBDWire.requestHeaderSize) {
            var r = NBDByteReader(h)
            _ = r.u32()
            let request = Request(flags: r.u16() ?? 0, type: r.u16() ?? 0, cookie: r.u64() ?? 0, offset: r.u64() ?? 0, length: r.u32() ?? 0)
            if request.type == NBDCommand.disconnect { return }
            seen.withLock { $0.append(request) }
            guard let answer = respond(request) else { return }
            put(answer)
        }
    }
}
