import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import NBDServer

/// Real NBD clients (libnbd's nbdinfo and nbdcopy, QEMU's qemu-img and qemu-io) against the
/// server, which runs in-process on a unix socket (and once on TCP).
@Suite("NBD server with real clients")
struct NBDServerInteropTests {
    @Test("nbdinfo --list shows every export with its size and description")
    func listsExports() throws {
        let s = try RunningServer()
        let out = try Tool.run("nbdinfo", ["--list", "--json", s.uri("")])
        let json = try JSONSerialization.jsonObject(with: out.stdoutData) as? [String: Any]
        let exports = try #require(json?["exports"] as? [[String: Any]])
        var seen: [String: (Int, String)] = [:]
        for e in exports {
            if let name = e["export-name"] as? String {
                seen[name] = ((e["export-size"] as? Int) ?? -1, (e["description"] as? String) ?? "")
            }
        }
        #expect(seen["disk"]?.0 == NBDFixture.size)
        #expect(seen["disk"]?.1 == "test disk (memory)")
        #expect(seen["scan"]?.0 == NBDFixture.size)
        #expect(seen["scan"]?.1 == "test disk (zero scan)")
        #expect(seen["rw"]?.0 == 8 * NBDFixture.mib)
        #expect(seen["rw"]?.1 == "scratch")
        #expect(seen.count == 3)
    }

    @Test("nbdinfo --map shows holes exactly where the zero and unallocated extents are")
    func mapShowsHoles() throws {
        let s = try RunningServer()
        #expect(try nbdinfoMap(s.uri("disk")) == NBDFixture.expectedMap)
        #expect(try nbdinfoMap(s.uri("scan")) == NBDFixture.expectedScanMap)
    }

    @Test("nbdcopy and qemu-img convert produce files equal to the disk", arguments: ["disk", "scan"])
    func copiesMatch(export: String) throws {
        let s = try RunningServer()
        let original = s.dir.file("original.raw")
        #expect(FileManager.default.createFile(atPath: original, contents: Data(NBDFixture.bytes)))
        let viaCopy = s.dir.file("nbdcopy.raw"), viaConvert = s.dir.file("convert.raw")
        try Tool.run("nbdcopy", [s.uri(export), viaCopy])
        try Tool.run("qemu-img", ["convert", "-f", "raw", s.uri(export), "-O", "raw", viaConvert])
        #expect(try readFile(viaCopy) == NBDFixture.bytes)
        #expect(try readFile(viaConvert) == NBDFixture.bytes)
        #expect(try Tool.qemuImgCompare(original, viaCopy, formatA: "raw", formatB: "raw"))
        #expect(try Tool.qemuImgCompare(s.uri(export), original, formatA: "raw", formatB: "raw"))
    }

    @Test("qemu-io random reads see the right bytes")
    func qemuIoRandomReads() throws {
        let s = try RunningServer()
        var rng = SeededRandom(seed: 9)
        let mib = NBDFixture.mib
        var commands: [String] = ["read -P 0x5a 16M 1M", "read -P 0 4M 2M", "read -P 0 10M 6M", "read -P 0 24M 1M"]
        for _ in 0..<40 {
            // Inside one 64 KiB block of the pattern region, or inside a zero region.
            if Bool.random(using: &rng) {
                let block = Int.random(in: (6 * mib / 65536)..<(10 * mib / 65536), using: &rng) * 65536
                let start = block + Int.random(in: 0..<65536, using: &rng)
                let length = Int.random(in: 1...(block + 65536 - start), using: &rng)
                commands.append("read -P 0x\(String(NBDFixture.patternByte(at: block), radix: 16)) \(start) \(length)")
            } else {
                let start = Int.random(in: 10 * mib..<16 * mib - 1, using: &rng)
                commands.append("read -P 0 \(start) \(Int.random(in: 1...(16 * mib - start), using: &rng))")
            }
        }
        let out = try Tool.run("qemu-io", ["-r", "-f", "raw"] + commands.flatMap { ["-c", $0] } + [s.uri("disk")])
        #expect(!out.stdout.contains("Pattern verification failed"), "\(out.stdout)")
        #expect(out.stdout.components(separatedBy: "read ").count - 1 == commands.count, "\(out.stdout)\(out.stderr)")
    }

    @Test("a qemu-io write and flush on the writable export is read back by nbdcopy")
    func writableExport() throws {
        let device = MemoryDevice(size: 8 * NBDFixture.mib)
        let s = try RunningServer(exports: [NBDExport(name: "rw", source: device, writable: device)])
        try Tool.run("qemu-io", ["-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "flush", "-c", "write -z 3M 1M", s.uri("rw")])
        let copy = s.dir.file("rw.raw")
        try Tool.run("nbdcopy", [s.uri("rw"), copy])
        var expected = [UInt8](repeating: 0, count: 8 * NBDFixture.mib)
        for i in NBDFixture.mib..<NBDFixture.mib + 65536 { expected[i] = 0xAB }
        #expect(try readFile(copy) == expected)
        #expect(device.snapshot == expected)
    }

    @Test("qemu-io cannot write to a read-only export")
    func readOnlyRefusesQemuWrite() throws {
        let s = try RunningServer()
        let out = try Tool.run("qemu-io", ["-f", "raw", "-c", "write -P 0xab 0 4k", s.uri("disk")], check: false)
        let text = (out.stdout + out.stderr).lowercased()
        #expect(out.status != 0 || text.contains("error"), "\(text)")
        #expect(text.contains("read-only") || text.contains("read only") || text.contains("not permitted") || text.contains("permission"), "\(text)")
        #expect(try readFile(try copyOut(s, "disk")) == NBDFixture.bytes)
    }

    @Test("TCP on 127.0.0.1 with an ephemeral port serves the same disk")
    func tcp() throws {
        let dir = try TempDir("nbd-tcp")
        let server = NBDServer(exports: NBDFixture.exports())
        defer { server.shutdown() }
        let port = try server.listen(port: 0)
        #expect(port > 0)
        let info = try Tool.run("nbdinfo", ["--size", "nbd://127.0.0.1:\(port)/disk"])
        #expect(info.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(NBDFixture.size)")
        let copy = dir.file("tcp.raw")
        try Tool.run("nbdcopy", ["nbd://127.0.0.1:\(port)/disk", copy])
        #expect(try readFile(copy) == NBDFixture.bytes)
    }
}

/// Copies an export to a file with nbdcopy; returns the file's path.
func copyOut(_ s: RunningServer, _ export: String, as name: String? = nil) throws -> String {
    let path = s.dir.file(name ?? "\(export)-copy.raw")
    try Tool.run("nbdcopy", [s.uri(export), path])
    return path
}
