import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import NBDServer

/// A source whose reads fail the way a damaged repository chunk would.
struct FailingSource: BlockSource {
    var size: UInt64 { 1 << 20 }
    var name: String { "failing" }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        throw CairnError(.corrupt, "chunk 1234 failed authentication", offset: offset)
    }
    func extents(in range: Range<UInt64>) throws -> [Extent] {
        throw CairnError(.corrupt, "index unreadable")
    }
}

/// The wire format of structured replies and metadata contexts, checked byte by byte with the
/// raw client (real clients already prove interoperability).
@Suite("NBD structured replies")
struct NBDStructuredReplyTests {
    let mib = UInt64(NBDFixture.mib)

    func connect(_ s: RunningServer, export: String) throws -> RawNBDClient {
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        try c.sendOption(8, [])
        #expect(try c.optionReply().type == 1)
        let selected = try #require(try c.metaContext(option: 10, export: export, queries: ["base:allocation", "other:thing"]))
        #expect(selected.map(\.1) == ["base:allocation"])
        _ = try c.go(export)
        return c
    }

    @Test("READ: data and hole chunks, DF gives one data chunk, errors are error chunks with a message")
    func reads() throws {
        let s = try RunningServer(exports: NBDFixture.exports() + [NBDExport(name: "bad", source: FailingSource())])
        let c = try connect(s, export: "disk")
        try c.request(type: 0, handle: 1, offset: 3 * mib, length: UInt32(2 * mib))
        let parts = try c.chunks()
        #expect(parts.map(\.type) == [1, 2])
        #expect(parts.allSatisfy { $0.handle == 1 })
        #expect(be64(parts[0].payload, 0) == 3 * mib)
        #expect(Array(parts[0].payload[8...]) == Array(NBDFixture.bytes[Int(3 * mib)..<Int(4 * mib)]))
        #expect(!parts[0].done && parts[1].done)
        #expect(be64(parts[1].payload, 0) == 4 * mib && be32(parts[1].payload, 8) == UInt32(mib))

        try c.request(type: 0, flags: 4, handle: 2, offset: 3 * mib, length: UInt32(2 * mib))
        let whole = try c.chunks()
        #expect(whole.count == 1 && whole[0].type == 1)
        #expect(Array(whole[0].payload[8...]) == Array(NBDFixture.bytes[Int(3 * mib)..<Int(5 * mib)]))

        try c.request(type: 0, handle: 3, offset: 32 * mib, length: 1)
        let err = try c.chunks()
        #expect(err.count == 1 && err[0].type == 0x8001 && err[0].handle == 3)
        #expect(be32(err[0].payload, 0) == 22)
        #expect(Int(err[0].payload[4]) << 8 | Int(err[0].payload[5]) == err[0].payload.count - 6)

        let bad = try RawNBDClient(socketPath: s.socket)
        try bad.handshake()
        try bad.sendOption(8, [])
        _ = try bad.optionReply()
        _ = try bad.go("bad")
        try bad.request(type: 0, handle: 4, offset: 0, length: 4096)
        let io = try bad.chunks()
        #expect(io.count == 1 && io[0].type == 0x8001 && be32(io[0].payload, 0) == 5)
        #expect(String(decoding: io[0].payload[6...], as: UTF8.self).contains("failed authentication"))
    }

    @Test("BLOCK_STATUS: one descriptor per run, REQ_ONE gives one, context id as negotiated")
    func blockStatus() throws {
        let s = try RunningServer()
        let c = try connect(s, export: "disk")
        try c.request(type: 7, handle: 5, offset: 3 * mib, length: UInt32(4 * mib))
        let r = try c.chunks()
        #expect(r.count == 1 && r[0].type == 5 && r[0].done)
        let p = r[0].payload
        #expect(be32(p, 0) == 1)
        let descriptors = stride(from: 4, to: p.count, by: 8).map { (be32(p, $0), be32(p, $0 + 4)) }
        #expect(descriptors.map(\.0) == [UInt32(mib), UInt32(2 * mib), UInt32(mib)])
        #expect(descriptors.map(\.1) == [0, 3, 0])

        try c.request(type: 7, flags: 8, handle: 6, offset: 3 * mib, length: UInt32(4 * mib))
        let one = try c.chunks()
        #expect(one[0].payload.count == 12 && be32(one[0].payload, 4) == UInt32(mib))
    }

    @Test("LIST_META_CONTEXT answers base: and no query with base:allocation; SET needs structured replies")
    func metaContexts() throws {
        let s = try RunningServer()
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        #expect(try c.metaContext(option: 10, export: "disk", queries: ["base:allocation"]) == nil)
        #expect(try c.metaContext(option: 9, export: "disk", queries: ["base:"])?.map(\.1) == ["base:allocation"])
        #expect(try c.metaContext(option: 9, export: "disk", queries: [])?.map(\.1) == ["base:allocation"])
        #expect(try c.metaContext(option: 9, export: "disk", queries: ["qemu:dirty-bitmap:x"])?.isEmpty == true)
        #expect(try c.metaContext(option: 9, export: "nope", queries: []) == nil)
        // Without SET_META_CONTEXT, BLOCK_STATUS is refused.
        _ = try c.go("disk")
        try c.request(type: 7, handle: 1, offset: 0, length: 4096)
        #expect(try c.simpleReply()?.error == 22)
    }

    @Test("NBD_OPT_EXPORT_NAME ends negotiation the old way; an unknown name closes the connection")
    func exportName() throws {
        let s = try RunningServer()
        let c = try RawNBDClient(socketPath: s.socket)
        try c.handshake()
        try c.sendOption(1, Array("disk".utf8))
        let reply = try #require(try c.receive(10))
        #expect(be64(reply, 0) == UInt64(NBDFixture.size))
        try c.request(type: 0, handle: 1, offset: 16 * mib, length: 16)
        #expect(try c.simpleReply()?.error == 0)
        #expect(try c.receive(16) == [UInt8](repeating: 0x5A, count: 16))

        let d = try RawNBDClient(socketPath: s.socket)
        try d.handshake(clientFlags: 1)
        try d.sendOption(1, Array("missing".utf8))
        #expect(try d.waitForClose())
    }
}
