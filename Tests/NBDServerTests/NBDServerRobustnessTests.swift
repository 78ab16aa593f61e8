import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import NBDServer

/// Bad and hostile clients: each gets what the protocol document asks for, and the server
/// keeps serving everyone else (checked with a real client afterwards).
@Suite("NBD server robustness")
struct NBDServerRobustnessTests {
    /// The server still answers a real client.
    func stillServes(_ s: RunningServer) throws {
        let info = try Tool.run("nbdinfo", ["--size", s.uri("disk")])
        #expect(info.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(NBDFixture.size)")
    }

    @Test("garbage instead of the client flags closes that connection only")
    func garbageFlags() throws {
        let s = try RunningServer()
        let c = try RawNBDClient(socketPath: s.socket)
        #expect(try c.receive(18) != nil)
        try c.send(Array("GARBAGE!GARBAGE!".utf8))
        #expect(try c.waitForClose())
        try stillServes(s)
    }

    @Test("an option without the IHAVEOPT magic closes the connection")
    func badOptionMagic() throws {
        let s = try RunningServer()
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        try c.send(Array(repeating: 0x41, count: 64))
        #expect(try c.waitForClose())
        try stillServes(s)
    }

    @Test("a client that connects and says nothing is closed after the negotiation timeout")
    func silentClient() throws {
        let s = try RunningServer(options: NBDServerOptions(negotiationTimeout: .seconds(1)))
        let c = try RawNBDClient(socketPath: s.socket)
        #expect(try c.receive(18) != nil)
        #expect(try c.waitForClose())
        try stillServes(s)
    }

    @Test("unknown options get ERR_UNSUP, STARTTLS ERR_POLICY, unknown exports ERR_UNKNOWN")
    func optionErrors() throws {
        let s = try RunningServer()
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        try c.sendOption(77, [1, 2, 3])
        #expect(try c.optionReply().type == 0x8000_0001)
        try c.sendOption(5, [])
        #expect(try c.optionReply().type == 0x8000_0002)
        #expect(throws: CairnError.self) { try c.go("no-such-export") }
        let (size, flags) = try c.go("disk")
        #expect(size == UInt64(NBDFixture.size))
        #expect(flags & 0x3 == 0x3)  // HAS_FLAGS | READ_ONLY
    }

    @Test("read past the end, unknown command, write to a read-only export: EINVAL, EINVAL, EPERM")
    func transmissionErrors() throws {
        let s = try RunningServer()
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        _ = try c.go("disk")
        let size = UInt64(NBDFixture.size)
        try c.request(type: 0, handle: 1, offset: size - 512, length: 4096)
        let pastEnd = try #require(try c.simpleReply())
        #expect(pastEnd.error == 22 && pastEnd.handle == 1)
        try c.request(type: 0, handle: 2, offset: UInt64.max - 10, length: 100)
        #expect(try c.simpleReply()?.error == 22)
        try c.request(type: 99, handle: 3, offset: 0, length: 512)
        let unknown = try #require(try c.simpleReply())
        #expect(unknown.error == 22 && unknown.handle == 3)
        try c.request(type: 1, handle: 4, offset: 0, length: 512, payload: [UInt8](repeating: 7, count: 512))
        let write = try #require(try c.simpleReply())
        #expect(write.error == 1 && write.handle == 4)
        try c.request(type: 6, handle: 5, offset: 0, length: 512)
        #expect(try c.simpleReply()?.error == 1)
        // A good read on the same connection still works afterwards.
        try c.request(type: 0, handle: 6, offset: 16 * UInt64(NBDFixture.mib), length: 4096)
        let good = try #require(try c.simpleReply())
        #expect(good.error == 0 && good.handle == 6)
        #expect(try c.receive(4096) == [UInt8](repeating: 0x5A, count: 4096))
        // DISC: the server closes without a reply.
        try c.request(type: 2, handle: 7, offset: 0, length: 0)
        #expect(try c.waitForClose())
        try stillServes(s)
    }

    @Test("a WRITE larger than the maximum payload gets EOVERFLOW and the connection is closed")
    func oversizedWrite() throws {
        let device = MemoryDevice(size: 1 << 20)
        let s = try RunningServer(exports: NBDFixture.exports() + [NBDExport(name: "w", source: device, writable: device)],
                                  options: NBDServerOptions(maxPayload: 65536))
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        _ = try c.go("w")
        try c.request(type: 1, handle: 9, offset: 0, length: 1 << 20)
        #expect(try c.simpleReply()?.error == 75)
        #expect(try c.waitForClose())
        try stillServes(s)
    }

    @Test("clients that send big READs and close without reading the replies do not hurt the server")
    func clientVanishesMidReply() throws {
        let s = try RunningServer()
        for round in 0..<5 {
            let c = try RawNBDClient(socketPath: s.socket)
            try c.handshake()
            _ = try c.go("disk")
            for h in 0..<4 { try c.request(type: 0, handle: UInt64(round * 10 + h), offset: 0, length: 32 << 20) }
            if round % 2 == 0 { _ = try c.receive(100) }  // some die mid-reply, some before it
        }
        let copy = try copyOut(s, "disk")
        #expect(try readFile(copy) == NBDFixture.bytes)
    }

    @Test("20 nbdcopy clients in parallel all get the right bytes")
    func parallelClients() throws {
        let s = try RunningServer()
        let nbdcopy = try Tool.which("nbdcopy")
        var processes: [(Process, String)] = []
        for i in 0..<20 {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: nbdcopy)
            let out = s.dir.file("par\(i).raw")
            p.arguments = [s.uri(i % 2 == 0 ? "disk" : "scan"), out]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            processes.append((p, out))
        }
        for (p, out) in processes {
            p.waitUntilExit()
            #expect(p.terminationStatus == 0)
            #expect(try readFile(out) == NBDFixture.bytes)
        }
    }

    @Test("shutdown closes connections and is idempotent")
    func shutdownTwice() throws {
        let s = try RunningServer()
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        _ = try c.go("disk")
        s.server.shutdown()
        #expect(try c.waitForClose())
        s.server.shutdown()
        #expect(s.server.connectionCount == 0)
    }
}

@Suite("NBD reply building")
struct NBDReplyTests {
    @Test("read segments follow the map, clip to the range and read gaps as data")
    func segments() {
        let src = MemoryBlockSource([UInt8](repeating: 1, count: 100), extents: [
            Extent(offset: 0, length: 10, kind: .data), Extent(offset: 10, length: 20, kind: .zero),
            Extent(offset: 30, length: 10, kind: .unallocated), Extent(offset: 50, length: 50, kind: .data),
        ])
        let parts = NBDReplies.segments(of: src, in: 5..<60)
        #expect(parts == [
            .init(offset: 5, length: 5, isHole: false), .init(offset: 10, length: 30, isHole: true),
            .init(offset: 40, length: 20, isHole: false),
        ])
    }
}

@Suite("NBD server backpressure")
struct NBDBackpressureTests {
    @Test("a client that pipelines 200 reads before reading any reply gets all of them, correct")
    func pipelinedReads() throws {
        let s = try RunningServer(options: NBDServerOptions(maxInFlight: 4))
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        _ = try c.go("disk")
        let length = 256 * 1024
        for h in 0..<200 {
            try c.request(type: 0, handle: UInt64(h), offset: UInt64(h % 128 * length), length: UInt32(length))
        }
        var seen = Set<UInt64>()
        for _ in 0..<200 {
            let reply = try #require(try c.simpleReply())
            #expect(reply.error == 0)
            let data = try #require(try c.receive(length))
            let offset = Int(reply.handle % 128) * length
            #expect(data == Array(NBDFixture.bytes[offset..<offset + length]))
            seen.insert(reply.handle)
        }
        #expect(seen.count == 200)
    }
}

extension NBDBackpressureTests {
    @Test("a client that sends 5000 LIST options before reading any reply gets every reply")
    func optionFlood() throws {
        let s = try RunningServer()
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        let list = bytes64(0x4948_4156_454F_5054) + bytes32(3) + bytes32(0)
        try c.send(Array([[UInt8]](repeating: list, count: 5000).joined()))
        var acks = 0, servers = 0
        while acks < 5000 {
            let (type, _) = try c.optionReply()
            if type == 1 { acks += 1 } else if type == 2 { servers += 1 } else { Issue.record("reply type \(type)"); break }
        }
        #expect(servers == 3 * 5000)
        _ = try c.go("disk")
    }
}

extension NBDServerRobustnessTests {
    @Test("a request without the request magic closes that connection")
    func badRequestMagic() throws {
        let s = try RunningServer()
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        _ = try c.go("disk")
        try c.send([UInt8](repeating: 0xEE, count: 28))
        #expect(try c.waitForClose())
        try stillServes(s)
    }
}
