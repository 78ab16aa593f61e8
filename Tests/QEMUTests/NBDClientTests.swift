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

private let mib = 1 << 20

/// A server process (qemu-nbd, nbdkit) on a unix socket, killed with SIGKILL by `stop()`.
private final class ServerProcess: @unchecked Sendable {
    // @unchecked: used from the test's thread (and `kill` from one helper thread).
    let process = Process()
    let socket: String
    let stderrPath: String

    init(_ dir: TempDir, _ tool: String, _ arguments: [String], socket: String) throws {
        self.socket = socket
        stderrPath = dir.file("\(tool)-\(UUID().uuidString.prefix(6)).err")
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: try Tool.which(tool))
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle(forWritingAtPath: stderrPath)
        try process.run()
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
    var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { stop() }
}

/// Byte-wise equality without a per-element loop (debug builds compare arrays slowly).
private func same(_ a: UnsafeRawBufferPointer, _ b: [UInt8], at offset: Int) -> Bool {
    guard offset >= 0, offset + a.count <= b.count else { return false }
    guard let pa = a.baseAddress, a.count > 0 else { return true }
    return b.withUnsafeBytes { memcmp(pa, $0.baseAddress! + offset, a.count) == 0 }
}

private func same(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    a.count == b.count && a.withUnsafeBytes { same($0, b, at: 0) }
}

/// Reads `count` bytes at `offset` through the client into a buffer full of garbage (so holes
/// must be written as zeros) and compares them with `expected`.
private func readMatches(_ c: NBDClient, _ expected: [UInt8], at offset: Int, count: Int) throws -> Bool {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 64)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
    try c.read(into: buffer, at: UInt64(offset))
    return same(UnsafeRawBufferPointer(buffer), expected, at: offset)
}

/// The map `qemu-img map --output=json` gives, in our terms: qemu's NBD server reports clusters
/// that read as zeros without data as HOLE|ZERO (unallocated), data+zero as ZERO only.
private func qemuImgMap(_ image: String, format: String) throws -> [Extent] {
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
private func nbdinfoMap(_ uri: String) throws -> [Extent] {
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
private func clip(_ map: [Extent], _ range: Range<UInt64>) -> [Extent] {
    map.compactMap { e in
        let lo = max(e.offset, range.lowerBound), hi = min(e.end, range.upperBound)
        return lo < hi ? Extent(offset: lo, length: hi - lo, kind: e.kind) : nil
    }
}

/// Runs `body`, returning the CairnError it throws (recording an issue if it does not throw one).
private func cairnError(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> CairnError? {
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

private func randomFile(_ path: String, size: Int, seed: UInt64) throws -> [UInt8] {
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
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let path = socket
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: path.utf8)
            raw[path.utf8.count] = 0
        }
        let fd = listener
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, listen(fd, 8) == 0 else { throw CairnError.errno("bind", errno, path: socket) }
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

// MARK: - Real servers

@Suite("NBD client against real servers")
struct NBDClientServerTests {
    @Test("qemu-nbd over qcow2 (data, zero clusters, unallocated): bytes equal qemu-img convert, extents equal qemu-img map")
    func qemuNBDQcow2() throws {
        let dir = try TempDir("nbdc-qcow2")
        let image = dir.file("d.qcow2")
        let size = 16 * mib
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", image, "\(size)"])
        try Tool.run("qemu-io", ["-f", "qcow2", image,
                                 "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 1M 64k",
                                 "-c", "write -P 0x33 3M 1M", "-c", "write -z 3584k 256k",
                                 "-c", "write -z 6M 2M", "-c", "write -P 0x44 12345678 100000",
                                 "-c", "write -P 0x55 15M 1M"])
        let raw = dir.file("d.raw")
        try Tool.run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, raw])
        let expected = try readFile(raw)
        let map = try qemuImgMap(image, format: "qcow2")
        #expect(map.contains { $0.kind == .unallocated } && map.contains { $0.kind == .data }, "\(map)")

        let server = try ServerProcess.qemuNBD(dir, format: "qcow2", image: image, export: "disk")
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 10)
        defer { c.close() }
        #expect(c.size == UInt64(size))
        #expect(c.isReadOnly)
        #expect(c.contexts == ["base:allocation"])
        #expect(c.usesStructuredReplies && c.usedGo)
        #expect(c.name == "nbd+unix:///disk?socket=\(server.socket)")

        #expect(try readMatches(c, expected, at: 0, count: size), "the whole disk in one read")
        var rng = SeededRandom(seed: 11)
        var requested = UInt64(size)
        for _ in 0..<64 {
            let offset = Int(rng.next() % UInt64(size))
            let count = Int(rng.next() % UInt64(min(size - offset, 3 * mib) + 1))
            requested += UInt64(count)
            #expect(try readMatches(c, expected, at: offset, count: count), "read of \(count) at \(offset)")
        }
        #expect(c.bytesRequested == requested)

        #expect(try c.allExtents() == map)
        for range in [UInt64(1_000_000)..<9_000_123, 3_670_016..<3_670_017, 12_345_678..<16_777_216] {
            #expect(try c.extents(in: range) == clip(map, range), "extents of \(range)")
        }
        #expect(try c.extents(in: UInt64(size)..<UInt64(size) + 10).isEmpty)
        let raw0 = try c.blockStatus(context: "base:allocation", in: 0..<UInt64(size))
        #expect(raw0.first?.range.lowerBound == 0 && raw0.last?.range.upperBound == UInt64(size))
        #expect(zip(raw0, raw0.dropFirst()).allSatisfy { $0.range.upperBound == $1.range.lowerBound && $0.flags != $1.flags })
    }

    @Test("qemu-nbd over a 10 GiB sparse qcow2: block status loops in 2 GiB requests and agrees with qemu-img map")
    func qemuNBDLargeSparse() throws {
        let dir = try TempDir("nbdc-large")
        let image = dir.file("big.qcow2")
        let size: UInt64 = 10 << 30
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", image, "\(size)"])
        let writes: [(UInt64, Int)] = [(0, 4096), ((3 << 30) + 12345, 70_000), ((5 << 30) - 65536, 131_072), (size - 512, 512)]
        try Tool.run("qemu-io", ["-f", "qcow2", image] + writes.flatMap { ["-c", "write -P 0x6b \($0.0) \($0.1)"] })
        let map = try qemuImgMap(image, format: "qcow2")
        let server = try ServerProcess.qemuNBD(dir, format: "qcow2", image: image, export: "big")
        let c = try NBDClient.connect(server.endpoint, export: "big", timeout: 10)
        defer { c.close() }
        #expect(c.size == size)
        #expect(try c.allExtents() == map)
        #expect(try c.extents(in: (2 << 30) - 7..<(7 << 30) + 3) == clip(map, (2 << 30) - 7..<(7 << 30) + 3))
        for (o, n) in writes {
            #expect(try c.readBytes(at: o, count: n).allSatisfy { $0 == 0x6B }, "data at \(o)")
            #expect(try c.readBytes(at: o + UInt64(n), count: min(4096, Int(size - o) - n)).allSatisfy { $0 == 0 }, "zeros after \(o)")
        }
    }

    @Test("wrong export name: a not-found error naming it and listing what the server offers")
    func wrongExportName() throws {
        let dir = try TempDir("nbdc-noexport")
        let image = dir.file("d.raw")
        _ = try randomFile(image, size: mib, seed: 1)
        let server = try ServerProcess.qemuNBD(dir, format: "raw", image: image, export: "disk")
        let e = cairnError { _ = try NBDClient.connect(server.endpoint, export: "nope", timeout: 10) }
        #expect(e?.code == .notFound)
        #expect(e?.message.contains("\"nope\"") == true, "\(String(describing: e))")
        #expect(e?.hint?.contains("\"disk\"") == true, "\(String(describing: e))")
        // The server is still fine for the right name.
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 10)
        #expect(c.size == UInt64(mib))
        c.close()
    }

    @Test("nbdkit file plugin with and without structured replies (--no-sr): reads equal the file; holes only with SR",
          arguments: [true, false])
    func nbdkitFile(structured: Bool) throws {
        let dir = try TempDir("nbdc-nbdkit-file")
        let path = dir.file("sparse.img")
        let size = 8 * mib
        try Tool.run("truncate", ["-s", "\(size)", path])
        var expected = [UInt8](repeating: 0, count: size)
        var rng = SeededRandom(seed: 3)
        for (offset, count) in [(0, 256 << 10), (mib, 64 << 10), (3 * mib + 4096, mib), (size - 128 << 10, 128 << 10)] {
            let b = rng.bytes(count)
            try writeBytes(b, to: path, at: UInt64(offset))
            expected.replaceSubrange(offset..<offset + count, with: b)
        }
        let server = try ServerProcess.nbdkit(dir, (structured ? [] : ["--no-sr"]) + ["file", path])
        let c = try NBDClient.connect(server.endpoint, export: "", timeout: 10)
        defer { c.close() }
        #expect(c.usesStructuredReplies == structured)
        #expect(c.contexts == (structured ? ["base:allocation"] : []))
        #expect(c.size == UInt64(size))
        #expect(try readMatches(c, expected, at: 0, count: size))
        #expect(try readMatches(c, expected, at: 123_457, count: 3 * mib + 11))
        let extents = try c.allExtents()
        if structured {
            #expect(extents == (try nbdinfoMap("nbd+unix:///?socket=\(server.socket)")))
            #expect(extents.contains { $0.kind == .unallocated }, "\(extents)")
        } else {
            #expect(extents == [Extent(offset: 0, length: UInt64(size), kind: .data)])
            let e = cairnError { _ = try c.blockStatus(context: "base:allocation", in: 0..<10) }
            #expect(e?.code == .unsupported)
        }
    }

    @Test("nbdkit data plugin behind an extent list: data, zero-only, hole+zero and hole-only map to data/zero/unallocated/data")
    func nbdkitExtentList() throws {
        let dir = try TempDir("nbdc-extentlist")
        let list = dir.file("extents")
        try "0 1M\n1M 1M zero\n2M 1M hole,zero\n3M 1M hole\n4M 512K\n".write(toFile: list, atomically: true, encoding: .utf8)
        let server = try ServerProcess.nbdkit(dir, ["-r", "--filter=extentlist", "data", "1 2 3 @0x480000 4 5 6", "size=5M", "extentlist=\(list)"])
        let c = try NBDClient.connect(server.endpoint, export: "x", timeout: 10)
        defer { c.close() }
        let m = UInt64(mib)
        #expect(try c.allExtents() == [
            Extent(offset: 0, length: m, kind: .data), Extent(offset: m, length: m, kind: .zero),
            Extent(offset: 2 * m, length: m, kind: .unallocated), Extent(offset: 3 * m, length: m + m / 2, kind: .data),
            Extent(offset: 4 * m + m / 2, length: m / 2, kind: .unallocated),
        ], "hole alone is data; the gap after the list is hole+zero")
        #expect(try c.readBytes(at: 0, count: 4) == [1, 2, 3, 0])
        #expect(try c.readBytes(at: 0x47FFFF, count: 5) == [0, 4, 5, 6, 0])
    }

    @Test("nbdkit without fixed newstyle (--mask-handshake=0): NBD_OPT_EXPORT_NAME, simple replies")
    func nbdkitPlainNewstyle() throws {
        let dir = try TempDir("nbdc-newstyle")
        let path = dir.file("d.img")
        let expected = try randomFile(path, size: 2 * mib, seed: 5)
        let server = try ServerProcess.nbdkit(dir, ["--mask-handshake=0", "file", path])
        let c = try NBDClient.connect(server.endpoint, export: "", timeout: 10)
        defer { c.close() }
        #expect(!c.usedGo && !c.usesStructuredReplies && c.contexts.isEmpty)
        #expect(c.size == UInt64(2 * mib))
        #expect(try readMatches(c, expected, at: 0, count: 2 * mib))
        #expect(try readMatches(c, expected, at: 777, count: 1))
    }

    @Test("oldstyle negotiation is refused as unsupported")
    func nbdkitOldstyle() throws {
        let dir = try TempDir("nbdc-oldstyle")
        let server = try ServerProcess.nbdkit(dir, ["-o", "memory", "1M"])
        let e = cairnError { _ = try NBDClient.connect(server.endpoint, export: "", timeout: 10) }
        #expect(e?.code == .unsupported)
        #expect(e?.message.contains("oldstyle") == true, "\(String(describing: e))")
    }

    @Test("nbdkit block size policy (minimum 4 KiB, maximum 64 KiB, misfits are errors): unaligned reads and big reads work")
    func nbdkitBlockSizePolicy() throws {
        let dir = try TempDir("nbdc-blocksize")
        let path = dir.file("d.img")
        let size = 2 * mib
        let expected = try randomFile(path, size: size, seed: 9)
        let server = try ServerProcess.nbdkit(dir, ["--filter=blocksize-policy", "file", path,
                                                    "blocksize-minimum=4096", "blocksize-preferred=65536",
                                                    "blocksize-maximum=65536", "blocksize-error-policy=error"])
        let c = try NBDClient.connect(server.endpoint, export: "", timeout: 10)
        defer { c.close() }
        #expect(c.limits == NBDBlockLimits(minimum: 4096, preferred: 65536, maximum: 65536))
        #expect(try readMatches(c, expected, at: 0, count: mib), "1 MiB becomes 16 requests")
        #expect(c.peakRequestsInFlight >= 16, "all pieces of one read are in flight together")
        #expect(try readMatches(c, expected, at: 1, count: 1))
        #expect(try readMatches(c, expected, at: 4095, count: 2))
        #expect(try readMatches(c, expected, at: 100_000, count: 300_001))
        #expect(try readMatches(c, expected, at: size - 5, count: 5))
        let map = try c.extents(in: 10..<1_000_001)
        #expect(map.first?.offset == 10 && map.last?.end == 1_000_001, "\(map)")
    }

    @Test("server errors name the errno, the export and the offset; the connection stays usable",
          arguments: ["EIO", "ENOSPC", "EINVAL", "EPERM"])
    func nbdkitErrors(errno name: String) throws {
        let dir = try TempDir("nbdc-errors")
        let server = try ServerProcess.nbdkit(dir, ["--filter=error", "memory", "4M", "error-pread=\(name)", "error-pread-rate=100%"])
        let c = try NBDClient.connect(server.endpoint, export: "vm-disk", timeout: 10)
        defer { c.close() }
        let e = cairnError { _ = try c.readBytes(at: 65536, count: 4096) }
        #expect(e?.code == .io)
        #expect(e?.message.contains(name) == true && e?.message.contains("\"vm-disk\"") == true, "\(String(describing: e))")
        #expect(e?.offset == 65536)
        #expect(e?.hint != nil)
        #expect(try c.allExtents().count >= 1, "block status still works after the failed read")
    }

    @Test("8 threads of random reads over a 64 MiB nbdkit export: every byte right, bytesRequested is the sum")
    func concurrentReads() throws {
        let dir = try TempDir("nbdc-concurrent")
        let path = dir.file("d.img")
        let size = 64 * mib
        let expected = try randomFile(path, size: size, seed: 21)
        let server = try ServerProcess.nbdkit(dir, ["--threads=8", "file", path])
        let c = try NBDClient.connect(server.endpoint, export: "", timeout: 10)
        defer { c.close() }
        let failures = Locked<[String]>([])
        let total = Locked<UInt64>(0)
        let group = DispatchGroup()
        for worker in 0..<8 {
            group.enter()
            Thread {
            defer { group.leave() }
            var rng = SeededRandom(seed: UInt64(100 + worker))
            var mine: UInt64 = 0
            for i in 0..<60 {
                // Mostly small reads; one per thread larger than the 32 MiB request limit.
                let count = i == 7 ? 40 * mib : Int(rng.next() % UInt64(512 << 10)) + 1
                let offset = Int(rng.next() % UInt64(size - count + 1))
                let view = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 64)
                defer { view.deallocate() }
                do {
                    try c.read(into: view, at: UInt64(offset))
                    if !same(UnsafeRawBufferPointer(view), expected, at: offset) {
                        failures.withLock { $0.append("worker \(worker): wrong bytes at \(offset)+\(count)") }
                    }
                } catch {
                    failures.withLock { $0.append("worker \(worker): \(error)") }
                }
                mine += UInt64(count)
            }
            total.withLock { $0 += mine }
            }.start()
        }
        group.wait()
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        #expect(c.bytesRequested == total.withLock { $0 })
        #expect(c.peakRequestsInFlight > 1)
    }

    @Test("server killed in the middle of a read: the read fails within seconds, naming the export")
    func serverKilledMidRead() throws {
        let dir = try TempDir("nbdc-killed")
        let server = try ServerProcess.nbdkit(dir, ["--filter=delay", "memory", "8M", "rdelay=30"])
        let c = try NBDClient.connect(server.endpoint, export: "vm-disk", timeout: 30)
        defer { c.close() }
        let outcome = Locked<(any Error)?>(nil)
        let finished = DispatchSemaphore(value: 0)
        Thread {
            do { _ = try c.readBytes(at: 0, count: mib) } catch { outcome.withLock { $0 = error } }
            finished.signal()
        }.start()
        usleep(300_000)
        let killedAt = nbdNow()
        server.stop()
        #expect(finished.wait(timeout: .now() + 5) == .success, "the read returned")
        #expect(nbdNow() - killedAt < 3)
        let e = try #require(outcome.withLock { $0 } as? CairnError)
        #expect(e.code == .io)
        #expect(e.message.contains("\"vm-disk\"") && e.message.contains("closed"), "\(e)")
        let later = cairnError { _ = try c.readBytes(at: 0, count: 1) }
        #expect(later?.message.contains("no longer usable") == true, "\(String(describing: later))")
    }

    @Test("qemu-storage-daemon dirty bitmap exported over NBD: dirtyRanges are the written ranges at bitmap granularity")
    func dirtyBitmap() throws {
        let dir = try TempDir("nbdc-bitmap")
        let image = dir.file("d.qcow2")
        let size: UInt64 = 16 << 20
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", image, "\(size)"])
        let socket = dir.file("nbd.sock")
        let daemon = try QEMUProcess.storageDaemon(dir, [
            "--blockdev", "driver=file,filename=\(image),node-name=file0",
            "--blockdev", "driver=qcow2,file=file0,node-name=disk0",
            "--nbd-server", "addr.type=unix,addr.path=\(socket)",
        ])
        defer { daemon.stop() }
        let qmp = try daemon.connect()
        defer { qmp.close() }
        let granularity: UInt64 = 65536
        try qmp.execute("block-dirty-bitmap-add", arguments: ["node": "disk0", "name": "b0", "granularity": Int(granularity)])
        try qmp.execute("block-export-add", arguments: ["type": "nbd", "id": "rw", "node-name": "disk0", "name": "rw", "writable": true])
        let writes: [(UInt64, UInt64)] = [(100_000, 5000), (0, 4096), (1 << 20 + 10, 70_000), (5 << 20, 1 << 20),
                                          (8 << 20 - 100, 200), (size - 1, 1)]
        try Tool.run("qemu-io", ["-f", "raw", "nbd+unix:///rw?socket=\(socket)"] + writes.flatMap { ["-c", "write -P 0x5a \($0.0) \($0.1)"] })
        try qmp.execute("block-dirty-bitmap-disable", arguments: ["node": "disk0", "name": "b0"])
        try qmp.execute("block-export-add", arguments: ["type": "nbd", "id": "ro", "node-name": "disk0", "name": "ro",
                                                        "writable": false, "bitmaps": ["b0"]])

        var expected: [Range<UInt64>] = []
        for (o, l) in writes.sorted(by: { $0.0 < $1.0 }) {
            let r = o / granularity * granularity..<(o + l + granularity - 1) / granularity * granularity
            if let last = expected.last, last.upperBound >= r.lowerBound {
                expected[expected.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                expected.append(r)
            }
        }
        let c = try NBDClient.connect(.unix(socket), export: "ro",
                                      metaContexts: ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:nope"], timeout: 10)
        defer { c.close() }
        #expect(c.contexts == ["base:allocation", "qemu:dirty-bitmap:b0"])
        #expect(c.isReadOnly)
        #expect(try c.dirtyRanges(context: "qemu:dirty-bitmap:b0") == expected)
        let part: Range<UInt64> = 70_000..<(5 << 20) + 1
        let clipped = expected.compactMap { r -> Range<UInt64>? in
            let lo = max(r.lowerBound, part.lowerBound), hi = min(r.upperBound, part.upperBound)
            return lo < hi ? lo..<hi : nil
        }
        #expect(try c.dirtyRanges(context: "qemu:dirty-bitmap:b0", in: part) == clipped)
        for (o, l) in writes {
            #expect(try c.readBytes(at: o, count: Int(l)).allSatisfy { $0 == 0x5A }, "written bytes at \(o)")
        }
        #expect(try c.readBytes(at: 2 << 20, count: 4096).allSatisfy { $0 == 0 })
        let e = cairnError { _ = try c.dirtyRanges(context: "qemu:dirty-bitmap:nope") }
        #expect(e?.code == .unsupported)
        #expect(e?.message.contains("qemu:dirty-bitmap:nope") == true && e?.hint?.contains("bitmaps") == true, "\(String(describing: e))")
    }
}

#if canImport(NBDServer)
@Suite("NBD client against Cairn's own NBD server")
struct NBDClientOwnServerTests {
    static let layout: [(Range<Int>, ExtentKind)] = [
        (0..<3, .data), (3..<5, .zero), (5..<9, .data), (9..<12, .unallocated), (12..<16, .data),
    ]

    static func fixture() -> ([UInt8], [Extent]) {
        var rng = SeededRandom(seed: 31)
        var bytes = rng.bytes(16 * mib)
        for (r, kind) in layout where kind != .data { bytes.replaceSubrange(r.lowerBound * mib..<r.upperBound * mib, with: [UInt8](repeating: 0, count: r.count * mib)) }
        let extents = layout.map { Extent(offset: UInt64($0.0.lowerBound * mib), length: UInt64($0.0.count * mib), kind: $0.1) }
        return (bytes, extents)
    }

    @Test("unix and TCP: bytes, holes (OFFSET_HOLE), a 64 KiB request limit and short block status answers",
          arguments: [false, true])
    func ownServer(tcp: Bool) throws {
        let (bytes, extents) = Self.fixture()
        let server = NBDServer(exports: [NBDExport(name: "snap/disk0", source: MemoryBlockSource(bytes, name: "mem", extents: extents))],
                               options: NBDServerOptions(maxPayload: 64 << 10, maxBlockStatusDescriptors: 2))
        defer { server.shutdown() }
        let dir = try TempDir("nbdc-own")
        let endpoint: NBDEndpoint
        if tcp {
            endpoint = .tcp(host: "127.0.0.1", port: try server.listen(port: 0))
        } else {
            try server.listen(unixSocket: dir.file("nbd.sock"))
            endpoint = .unix(dir.file("nbd.sock"))
        }
        let c = try NBDClient.connect(endpoint, export: "snap/disk0", timeout: 10)
        defer { c.close() }
        #expect(c.size == UInt64(bytes.count) && c.isReadOnly && c.contexts == ["base:allocation"])
        #expect(c.limits.maximum == 64 << 10)
        #expect(try readMatches(c, bytes, at: 0, count: bytes.count))
        #expect(c.peakRequestsInFlight >= 256, "16 MiB in 64 KiB requests, all sent before waiting")
        #expect(try readMatches(c, bytes, at: 3 * mib - 10, count: 2 * mib + 20), "across the zero extent")
        // The server calls zero and unallocated extents HOLE|ZERO; two descriptors per answer make the client loop.
        let expected = extents.map { Extent(offset: $0.offset, length: $0.length, kind: $0.kind == .data ? .data : .unallocated) }.coalesced()
        #expect(try c.allExtents() == expected)
        let part = UInt64(4 * mib)..<UInt64(10 * mib + 1)
        #expect(try c.extents(in: part) == clip(expected, part))
        #expect(c.name.contains("snap/disk0"))
    }
}
#endif

// MARK: - Scripted servers: fallbacks and malformed replies

@Suite("NBD client against a scripted server")
struct NBDClientScriptedTests {
    @Test("GO unsupported: falls back to NBD_OPT_EXPORT_NAME, keeping structured replies and meta contexts")
    func goFallback() throws {
        let dir = try TempDir("nbdc-fake-go")
        var config = FakeNBDServer.Config()
        config.go = false
        let server = try FakeNBDServer(dir, config)
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 5)
        defer { c.close() }
        #expect(!c.usedGo && c.usesStructuredReplies && c.contexts == ["base:allocation"])
        #expect(c.size == config.size)
        #expect(try c.readBytes(at: 1000, count: 5000) == FakeNBDServer.bytes(1000, 5000))
        #expect(try c.allExtents() == [Extent(offset: 0, length: config.size, kind: .data)])
        let e = cairnError { _ = try NBDClient.connect(server.endpoint, export: "other", timeout: 5) }
        #expect(e?.code == .notFound && e?.message.contains("\"other\"") == true && e?.message.contains("closed the connection") == true,
                "\(String(describing: e))")
    }

    @Test("simple replies when structured replies are refused; unknown export via GO is not-found")
    func simpleReplies() throws {
        let dir = try TempDir("nbdc-fake-simple")
        var config = FakeNBDServer.Config()
        config.structured = false
        let server = try FakeNBDServer(dir, config) { r in
            r.offset == 4096 ? FakeNBDServer.simple(r.cookie, error: 5) : FakeNBDServer.simple(r.cookie, FakeNBDServer.bytes(r.offset, Int(r.length)))
        }
        let c = try NBDClient.connect(server.endpoint, export: "disk", metaContexts: ["base:allocation"], timeout: 5)
        defer { c.close() }
        #expect(!c.usesStructuredReplies && c.contexts.isEmpty && c.usedGo)
        #expect(try c.readBytes(at: 10, count: 100) == FakeNBDServer.bytes(10, 100))
        let e = cairnError { _ = try c.readBytes(at: 4096, count: 10) }
        #expect(e?.message.contains("EIO") == true, "\(String(describing: e))")
        #expect(try c.readBytes(at: 0, count: 3) == FakeNBDServer.bytes(0, 3), "a simple error reply leaves the stream in sync")
        let missing = cairnError { _ = try NBDClient.connect(server.endpoint, export: "other", timeout: 5) }
        #expect(missing?.code == .notFound && missing?.hint?.contains("\"disk\"") == true, "\(String(describing: missing))")
    }

    @Test("data and hole chunks in any order fill the buffer; an error chunk fails only its request")
    func chunksAndErrors() throws {
        let dir = try TempDir("nbdc-fake-chunks")
        let server = try FakeNBDServer(dir) { r in
            let c = r.cookie, o = r.offset
            if r.offset == 8192 { return FakeNBDServer.error(c, code: 28, "disk on fire", offset: 8192 + 100) }
            if r.offset == 16384 { return FakeNBDServer.error(c, code: 12345, "") }
            // Out of order: the tail first, then a hole, then the head, then NONE+DONE.
            return FakeNBDServer.data(c, at: o + 3000, Int(r.length) - 3000) + FakeNBDServer.hole(c, at: o + 1000, 2000)
                + FakeNBDServer.data(c, at: o, 1000) + FakeNBDServer.chunk(c, type: NBDReplyType.none, done: true, [])
        }
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 5)
        defer { c.close() }
        var want = FakeNBDServer.bytes(0, 4096)
        for i in 1000..<3000 { want[i] = 0 }
        #expect(try readMatches(c, want, at: 0, count: 4096))
        let e = cairnError { _ = try c.readBytes(at: 8192, count: 4096) }
        #expect(e?.code == .io && e?.offset == 8292)
        #expect(e?.message.contains("ENOSPC") == true && e?.message.contains("disk on fire") == true, "\(String(describing: e))")
        let odd = cairnError { _ = try c.readBytes(at: 16384, count: 10) }
        #expect(odd?.message.contains("error 12345") == true, "\(String(describing: odd))")
        #expect(try c.readBytes(at: 0, count: 4096) == want, "still usable")
    }

    @Test("block status: short answers loop, overlong ones are clipped, ZERO alone is .zero and HOLE alone is .data")
    func blockStatusShapes() throws {
        let dir = try TempDir("nbdc-fake-status")
        var config = FakeNBDServer.Config()
        config.contexts = ["base:allocation": 7, "qemu:dirty-bitmap:b": 9]
        config.size = 1 << 20
        let server = try FakeNBDServer(dir, config) { r in
            guard r.type == NBDCommand.blockStatus else { return FakeNBDServer.good(r) }
            // At most 4 KiB per answer, flags by offset; a short request gets a descriptor past its end.
            let f: UInt32 = [0, 2, 3, 1][Int(r.offset / 4096 % 4)]
            return FakeNBDServer.status(r.cookie, context: 9, [(4096, r.offset / 4096 % 2 == 0 ? 1 : 0)], done: false)
                + FakeNBDServer.status(r.cookie, context: 7, r.length > 4096 ? [(2048, f), (2048, f)] as [(UInt32, UInt32)] : [(1 << 30, f)])
        }
        let c = try NBDClient.connect(server.endpoint, export: "disk", metaContexts: ["base:allocation", "qemu:dirty-bitmap:b"], timeout: 5)
        defer { c.close() }
        #expect(c.contexts == ["base:allocation", "qemu:dirty-bitmap:b"])
        let kinds: [ExtentKind] = [.data, .zero, .unallocated, .data]
        let want = (0..<8).map { Extent(offset: UInt64($0 * 4096), length: 4096, kind: kinds[$0 % 4]) }.coalesced()
        #expect(try c.extents(in: 0..<32768) == want)
        #expect(try c.extents(in: 100..<5000) == [Extent(offset: 100, length: 4096, kind: .data), Extent(offset: 4196, length: 804, kind: .zero)])
        #expect(try c.dirtyRanges(context: "qemu:dirty-bitmap:b", in: 0..<20000) == [0..<4096, 8192..<12288, 16384..<20000])
    }

    @Test("an export of 2^64 - 1 bytes with 4 KiB alignment: reads and block status at the very end do not overflow")
    func hugeExport() throws {
        let dir = try TempDir("nbdc-fake-huge")
        var config = FakeNBDServer.Config()
        config.size = UInt64.max
        config.blockSize = (4096, 4096, 65536)
        let server = try FakeNBDServer(dir, config) { r in
            guard r.type == NBDCommand.blockStatus else { return FakeNBDServer.good(r) }
            return FakeNBDServer.status(r.cookie, context: 1, [(UInt32.max, NBDAllocation.hole | NBDAllocation.zero)])
        }
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 5)
        defer { c.close() }
        #expect(c.size == UInt64.max)
        let top = UInt64.max
        #expect(try c.readBytes(at: top - 10, count: 10) == FakeNBDServer.bytes(top - 10, 10))
        #expect(try c.readBytes(at: top - 5000, count: 3) == FakeNBDServer.bytes(top - 5000, 3))
        #expect(try c.extents(in: top - 5000..<top) == [Extent(offset: top - 5000, length: 5000, kind: .unallocated)])
        #expect(try c.extents(in: top - (3 << 30)..<top) == [Extent(offset: top - (3 << 30), length: 3 << 30, kind: .unallocated)])
        #expect(server.seen.withLock { $0 }.allSatisfy { $0.offset % 4096 == 0 && ($0.length % 4096 == 0 || $0.offset + UInt64($0.length) == top) })
        #expect(NBDClient.roundUp(top - 1, 4096, limit: top) == top)
        #expect(NBDClient.roundUp(4097, 4096, limit: 1 << 20) == 8192)
        #expect(NBDClient.roundUp(8192, 4096, limit: 1 << 20) == 8192)
        #expect(NBDClient.roundUp(8193, 4096, limit: 10_000) == 10_000)
    }

    @Test("a server that stops answering: requests fail after the timeout")
    func silentServer() throws {
        let dir = try TempDir("nbdc-fake-silent")
        let server = try FakeNBDServer(dir) { _ in [] }
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 1)
        defer { c.close() }
        let start = nbdNow()
        let e = cairnError { _ = try c.readBytes(at: 0, count: 10) }
        #expect(nbdNow() - start < 4)
        #expect(e?.message.contains("no reply") == true && e?.message.contains("\"disk\"") == true, "\(String(describing: e))")
    }

    @Test("malformed replies are protocol violations: the request fails, the connection is closed, nothing traps",
          arguments: [
            "overlap", "outside", "short", "cookie", "magic", "type", "emptyHole", "emptyData", "errorMessage",
            "hugeStatus", "simpleData", "statusInRead", "noneWithoutDone", "unknownContext",
          ])
    func malformed(kind: String) throws {
        let dir = try TempDir("nbdc-fake-bad")
        let server = try FakeNBDServer(dir) { r in
            let c = r.cookie, o = r.offset
            switch kind {
            case "overlap": return FakeNBDServer.data(c, at: o, 2048) + FakeNBDServer.data(c, at: o + 1024, 3072, done: true)
            case "outside": return FakeNBDServer.data(c, at: o + 4000, 200, done: true)
            case "short": return FakeNBDServer.data(c, at: o, 2048, done: true)
            case "cookie": return FakeNBDServer.data(c + 1000, at: o, 4096, done: true)
            case "magic": return [UInt8](repeating: 0xAB, count: 32)
            case "type": return FakeNBDServer.chunk(c, type: 42, done: true, [1, 2, 3])
            case "emptyHole": return FakeNBDServer.hole(c, at: o, 0, done: true)
            case "emptyData": return FakeNBDServer.chunk(c, type: NBDReplyType.offsetData, done: true, [0, 0, 0, 0, 0, 0, 0, 0])
            case "errorMessage": return FakeNBDServer.chunk(c, type: NBDReplyType.error, done: true, [0, 0, 0, 5, 0xFF, 0xFF, 65])
            case "hugeStatus": return Array(FakeNBDServer.chunk(c, type: NBDReplyType.blockStatus, done: true, []).prefix(16)) + [0xFF, 0xFF, 0xFF, 0xFF]
            case "simpleData": return FakeNBDServer.simple(c, FakeNBDServer.bytes(o, Int(r.length)))
            case "statusInRead": return FakeNBDServer.status(c, context: 1, [(4096, 0)])
            case "noneWithoutDone": return FakeNBDServer.chunk(c, type: NBDReplyType.none, [])
            default: return FakeNBDServer.status(c, context: 77, [(4096, 0)])
            }
        }
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 5)
        defer { c.close() }
        let start = nbdNow()
        let e = cairnError {
            if kind == "unknownContext" { _ = try c.allExtents() } else { _ = try c.readBytes(at: 0, count: 4096) }
        }
        #expect(nbdNow() - start < 3)
        #expect(e?.code == .io)
        #expect(e?.message.contains("protocol violation") == true, "\(kind): \(String(describing: e))")
        let later = cairnError { _ = try c.readBytes(at: 0, count: 1) }
        #expect(later?.message.contains("no longer usable") == true)
    }

    @Test("close is idempotent and later calls fail at once; ESHUTDOWN stops new requests")
    func closeAndShutdown() throws {
        let dir = try TempDir("nbdc-fake-close")
        let server = try FakeNBDServer(dir) { r in
            r.offset == 0 ? FakeNBDServer.good(r) : FakeNBDServer.error(r.cookie, code: 108, "going down")
        }
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 5)
        #expect(try c.readBytes(at: 0, count: 10) == FakeNBDServer.bytes(0, 10))
        let e = cairnError { _ = try c.readBytes(at: 10, count: 10) }
        #expect(e?.message.contains("ESHUTDOWN") == true, "\(String(describing: e))")
        let after = cairnError { _ = try c.readBytes(at: 0, count: 10) }
        #expect(after?.message.contains("shutting down") == true, "\(String(describing: after))")
        c.close()
        c.close()
        let closed = cairnError { _ = try c.readBytes(at: 0, count: 10) }
        #expect(closed?.code == .io)

        let d = try NBDClient.connect(server.endpoint, export: "disk", timeout: 5)
        d.close()
        d.close()
        let e2 = cairnError { _ = try d.readBytes(at: 0, count: 10) }
        #expect(e2?.message.contains("closed by Cairn") == true, "\(String(describing: e2))")
        #expect(cairnError { try d.read(into: UnsafeMutableRawBufferPointer(start: nil, count: 0), at: 2 << 20) }?.message.contains("past the end") == true)
    }

    @Test("connecting to nothing or to a non-NBD socket fails within the timeout")
    func connectFailures() throws {
        let dir = try TempDir("nbdc-fake-connect")
        let start = nbdNow()
        let e = cairnError { _ = try NBDClient.connect(.unix(dir.file("missing.sock")), export: "x", timeout: 0.5) }
        #expect(nbdNow() - start < 3)
        #expect(e?.code == .io && e?.message.contains("cannot connect") == true, "\(String(describing: e))")
        let tcp = cairnError { _ = try NBDClient.connect(.tcp(host: "127.0.0.1", port: 1), export: "x", timeout: 0.3) }
        #expect(tcp?.code == .io)

        let silent = try SilentQMPServer(path: dir.file("qmp.sock"))
        defer { silent.stop() }
        let wrong = cairnError { _ = try NBDClient.connect(.unix(silent.path), export: "x", timeout: 2) }
        #expect(wrong?.message.contains("NBDMAGIC") == true, "\(String(describing: wrong))")
    }
}

// MARK: - The wire codecs alone

@Suite("NBD client wire codecs")
struct NBDClientWireTests {
    @Test("decoders are total: random and truncated input never traps")
    func decodersAreTotal() {
        var rng = SeededRandom(seed: 77)
        let types: [UInt16] = [0, 1, 2, 5, 0x8001, 0x8002, 0x8003, 42]
        for round in 0..<20_000 {
            let count = Int(rng.next() % 48)
            var bytes = rng.bytes(count)
            if round % 3 == 0, count >= 4 { bytes.replaceSubrange(0..<4, with: [0x66, 0x8E, 0x33, 0xEF]) }
            if round % 3 == 1, count >= 4 { bytes.replaceSubrange(0..<4, with: [0x67, 0x44, 0x66, 0x98]) }
            _ = NBDReplyHeader.decode(bytes)
            _ = NBDOptionReplyHeader.decode(bytes, expecting: 7)
            _ = NBDInfoItem.decode(bytes)
            for t in types { _ = NBDChunkPayload.decode(type: t, bytes) }
        }
    }

    @Test("headers and payloads decode to what was encoded")
    func roundTrips() {
        var simple: [UInt8] = []
        simple.appendBE(NBDMagic.simpleReply)
        simple.appendBE(UInt32(22))
        simple.appendBE(UInt64(0x0102_0304_0506_0708))
        #expect(NBDReplyHeader.decode(simple) == .success(.simple(error: 22, cookie: 0x0102_0304_0506_0708)))
        let chunk = FakeNBDServer.chunk(9, type: 5, done: true, [1, 2, 3])
        #expect(NBDReplyHeader.decode(Array(chunk.prefix(16))) == .success(.needMore))
        #expect(NBDReplyHeader.decode(Array(chunk.prefix(20))) == .success(.chunk(flags: 1, type: 5, cookie: 9, length: 3)))
        let err = FakeNBDServer.error(1, code: 5, "bad", offset: 77)
        #expect(NBDChunkPayload.decode(type: NBDReplyType.errorOffset, Array(err.dropFirst(20))) == .success(.error(code: 5, message: "bad", offset: 77)))
        let st = FakeNBDServer.status(1, context: 3, [(512, 1), (1024, 3)])
        #expect(NBDChunkPayload.decode(type: 5, Array(st.dropFirst(20)))
                == .success(.blockStatus(context: 3, descriptors: [NBDDescriptor(length: 512, flags: 1), NBDDescriptor(length: 1024, flags: 3)])))
        #expect(NBDWire.errorName(28) == "ENOSPC" && NBDWire.errorName(5) == "EIO" && NBDWire.errorName(22) == "EINVAL")
        #expect(NBDBlockLimits(minimum: 3, preferred: 0, maximum: 0) == NBDBlockLimits())
        #expect(NBDBlockLimits(minimum: 4096, preferred: 512, maximum: 1024) == NBDBlockLimits(minimum: 4096, preferred: 4096, maximum: 0))
        #expect(NBDBlockLimits(minimum: 512, preferred: 4096, maximum: 1 << 30).readLimit == 32 << 20)
        #expect(NBDBlockLimits(minimum: 4096, preferred: 4096, maximum: 100_000).readLimit == 98304)
    }

    @Test("read assembly accepts every byte exactly once, in any order, and nothing outside")
    func readAssembly() {
        var rng = SeededRandom(seed: 5)
        for _ in 0..<300 {
            let length = UInt64(rng.next() % 5000 + 1)
            let offset = rng.next() % 1_000_000
            var a = NBDReadAssembly(offset: offset, length: length)
            var model = [Bool](repeating: false, count: Int(length))
            for _ in 0..<40 {
                let start = offset &+ rng.next() % (length + 20) &- 10
                let count = rng.next() % 700
                let result = a.claim(start, count: count)
                let inside = count > 0 && start >= offset && start - offset <= length && count <= length - (start - offset)
                let free = inside && !model[Int(start - offset)..<Int(start - offset + count)].contains(true)
                switch result {
                case .success(let at):
                    #expect(free && UInt64(at) == start - offset)
                    for i in at..<at + Int(count) { model[i] = true }
                case .failure:
                    #expect(!free)
                }
                #expect(a.deliveredBytes == UInt64(model.filter { $0 }.count))
            }
            #expect(a.isComplete == !model.contains(false))
        }
        var full = NBDReadAssembly(offset: 10, length: 30)
        _ = full.claim(30, count: 10)
        _ = full.claim(10, count: 10)
        _ = full.claim(20, count: 10)
        #expect(full.isComplete && full.delivered == [0..<30])
    }
}
