import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A deliberately dumb NBD client over a unix socket, for robustness tests: it sends exactly
/// the bytes a test asks for and reads replies field by field (no structured replies).
final class RawNBDClient {
    let fd: Int32

    init(socketPath: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw CairnError.errno("socket", errno, path: socketPath) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let path = Array(socketPath.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, c) in path.prefix(p.count - 1).enumerated() { p[i] = c }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            Glibc.close(fd)
            throw CairnError.errno("connect", e, path: socketPath)
        }
        // A safety net so a broken server fails the test instead of hanging it (not a timing assertion).
        var tv = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(fd) }

    func send(_ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw CairnError.errno("send", errno, path: "raw client") }
            sent += n
        }
    }

    /// Exactly `count` bytes, or nil if the server closed the connection first.
    func receive(_ count: Int) throws -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, count - got, 0) }
            if n == 0 { return nil }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == ECONNRESET { return nil }
                throw CairnError.errno("recv", errno, path: "raw client")
            }
            got += n
        }
        return out
    }

    /// Reads and discards until the server closes the connection; true when it did.
    func waitForClose() throws -> Bool {
        var sink = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = sink.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, 65536, 0) }
            if n == 0 { return true }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == ECONNRESET { return true }
                return false
            }
        }
    }

    /// Reads the server greeting and answers with `clientFlags`.
    func handshake(clientFlags: UInt32 = 3) throws {
        guard let greeting = try receive(18) else { throw CairnError(.io, "server closed during greeting") }
        guard be64(greeting, 0) == 0x4E42_444D_4147_4943, be64(greeting, 8) == 0x4948_4156_454F_5054 else {
            throw CairnError(.io, "bad greeting")
        }
        try send(bytes32(clientFlags))
    }

    func sendOption(_ option: UInt32, _ data: [UInt8]) throws {
        try send(bytes64(0x4948_4156_454F_5054) + bytes32(option) + bytes32(UInt32(data.count)) + data)
    }

    /// One option reply: (reply type, data).
    func optionReply() throws -> (type: UInt32, data: [UInt8]) {
        guard let h = try receive(20) else { throw CairnError(.io, "server closed during an option reply") }
        let length = Int(be32(h, 16))
        let data = length > 0 ? (try receive(length) ?? []) : []
        return (be32(h, 12), data)
    }

    /// NBD_OPT_GO for `name`; returns the export size and transmission flags.
    func go(_ name: String) throws -> (size: UInt64, flags: UInt16) {
        let n = Array(name.utf8)
        try sendOption(7, bytes32(UInt32(n.count)) + n + [0, 0])
        var result: (UInt64, UInt16)?
        while true {
            let (type, data) = try optionReply()
            if type == 3, data.count >= 12, data[0] == 0, data[1] == 0 {
                result = (be64(data, 2), UInt16(data[10]) << 8 | UInt16(data[11]))
            } else if type == 1 {
                guard let result else { throw CairnError(.io, "GO acknowledged without export info") }
                return result
            } else if type & 0x8000_0000 != 0 {
                throw CairnError(.io, "GO refused with reply type 0x\(String(type, radix: 16))")
            }
        }
    }

    func request(type: UInt16, flags: UInt16 = 0, handle: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) throws {
        try send(bytes32(0x2560_9513) + bytes16(flags) + bytes16(type) + bytes64(handle) + bytes64(offset) + bytes32(length) + payload)
    }

    /// A simple reply header: (error, handle), or nil if the server closed the connection.
    func simpleReply() throws -> (error: UInt32, handle: UInt64)? {
        guard let h = try receive(16) else { return nil }
        guard be32(h, 0) == 0x6744_6698 else { throw CairnError(.io, "not a simple reply") }
        return (be32(h, 4), be64(h, 8))
    }
}

func bytes16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
func bytes32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * $0)) } }
func bytes64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * $0)) } }
func be32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(b[at + $1]) } }
func be64(_ b: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 << 8 | UInt64(b[at + $1]) } }

extension RawNBDClient {
    struct Chunk {
        var flags: UInt16
        var type: UInt16
        var handle: UInt64
        var payload: [UInt8]
        var done: Bool { flags & 1 != 0 }
    }

    /// One structured reply chunk.
    func chunk() throws -> Chunk {
        guard let h = try receive(20) else { throw CairnError(.io, "server closed during a reply") }
        guard be32(h, 0) == 0x668E_33EF else { throw CairnError(.io, "not a structured reply chunk") }
        let length = Int(be32(h, 16))
        let payload = length > 0 ? (try receive(length) ?? []) : []
        return Chunk(flags: UInt16(h[4]) << 8 | UInt16(h[5]), type: UInt16(h[6]) << 8 | UInt16(h[7]), handle: be64(h, 8), payload: payload)
    }

    /// Every chunk of one reply, up to the one flagged done.
    func chunks() throws -> [Chunk] {
        var out: [Chunk] = []
        repeat { out.append(try chunk()) } while !(out.last?.done ?? true)
        return out
    }

    /// The data of a META_CONTEXT option (list or set) for `export` with `queries`: the
    /// (id, name) replies before the final ACK, or nil if the server answered with an error.
    func metaContext(option: UInt32, export: String, queries: [String]) throws -> [(UInt32, String)]? {
        let name = Array(export.utf8)
        var data = bytes32(UInt32(name.count)) + name + bytes32(UInt32(queries.count))
        for q in queries { data += bytes32(UInt32(q.utf8.count)) + Array(q.utf8) }
        try sendOption(option, data)
        var out: [(UInt32, String)] = []
        while true {
            let (type, d) = try optionReply()
            if type == 4 { out.append((be32(d, 0), String(decoding: d[4...], as: UTF8.self))) }
            else if type == 1 { return out }
            else { return nil }
        }
    }
}
