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
