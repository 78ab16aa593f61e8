import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

/// Fixture builders and referees for the qcow2 tests: images are made by qemu-img/qemu-io and
/// `qemu-img convert -O raw` / `qemu-img map` are the referees.
enum Fixture {
    /// A deterministic disk image of `size` bytes: random and compressible data at scattered
    /// unaligned offsets, holes between them and explicit zero runs inside data.
    static func pattern(size: Int, seed: UInt64, segments: Int = 40) -> [UInt8] {
        var rng = SeededRandom(seed: seed)
        var bytes = [UInt8](repeating: 0, count: size)
        for i in 0..<segments {
            let length = Int.random(in: 1...min(size, 120_000), using: &rng)
            let offset = Int.random(in: 0...(size - length), using: &rng)
            if i % 2 == 0 {
                let data = rng.bytes(length)
                bytes.replaceSubrange(offset..<offset + length, with: data)
            } else {
                // Compressible: text-like bytes from a small alphabet.
                for j in 0..<length { bytes[offset + j] = UInt8(65 + Int(rng.next() % 4)) }
            }
        }
        // Explicit zero runs punched into the data.
        for _ in 0..<segments / 4 {
            let length = Int.random(in: 1...min(size, 90_000), using: &rng)
            let offset = Int.random(in: 0...(size - length), using: &rng)
            for j in offset..<offset + length { bytes[j] = 0 }
        }
        // Always some data in the first and the last (partial) cluster.
        bytes[0] = 0xA5
        bytes[size - 1] = 0x5A
        return bytes
    }

    static func writeFile(_ bytes: [UInt8], to path: String) throws {
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
    }

    @discardableResult
    static func qemuImg(_ args: [String]) throws -> Tool.Result {
        try Tool.run("qemu-img", args)
    }

    /// Runs qemu-io commands on a qcow2 image.
    static func qemuIO(_ path: String, _ commands: [String], format: String = "qcow2") throws {
        var args = ["-f", format]
        for c in commands { args += ["-c", c] }
        args.append(path)
        let r = try Tool.run("qemu-io", args)
        #expect(!r.stdout.contains("error") && !r.stderr.contains("error"), "qemu-io: \(r.stdout) \(r.stderr)")
    }

    /// The raw contents of any image qemu can read (following its backing chain).
    static func referee(_ path: String, in dir: TempDir) throws -> [UInt8] {
        let out = dir.file("referee-\(UUID().uuidString.prefix(8)).raw")
        try qemuImg(["convert", "-O", "raw", path, out])
        defer { try? FileManager.default.removeItem(atPath: out) }
        return try readFile(out)
    }

    static func open(_ path: String, backing: (any BlockSource)? = nil) throws -> QCOW2Image {
        try QCOW2Image(file: FileBlockSource(path: path), backing: backing)
    }

    static func readAll(_ source: any BlockSource) throws -> [UInt8] {
        try source.readBytes(at: 0, count: Int(source.size))
    }

    /// `qemu-img map` as extents: data → .data, present zero → .zero, not present → .unallocated.
    static func qemuMap(_ path: String) throws -> [Extent] {
        let r = try qemuImg(["map", "--output=json", path])
        let json = try JSONSerialization.jsonObject(with: r.stdoutData) as? [[String: Any]] ?? []
        var out: [Extent] = []
        for entry in json {
            let start = (entry["start"] as? NSNumber)?.uint64Value ?? 0
            let length = (entry["length"] as? NSNumber)?.uint64Value ?? 0
            let data = (entry["data"] as? Bool) ?? false
            let present = (entry["present"] as? Bool) ?? true
            let kind: ExtentKind = data ? .data : (present ? .zero : .unallocated)
            out.append(Extent(offset: start, length: length, kind: kind))
        }
        return out.coalesced()
    }

    /// Checks `source` against the referee bytes: whole-disk read, random unaligned reads,
    /// concurrent reads, and extents (exact cover, zero outside data, equal to qemu-img map).
    static func verify(_ source: any BlockSource, equals expected: [UInt8], qemuMapOf path: String? = nil,
                       seed: UInt64 = 7, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(source.size == UInt64(expected.count), sourceLocation: sourceLocation)
        let all = try readAll(source)
        #expect(difference(all, expected) == nil, "whole-disk read differs", sourceLocation: sourceLocation)

        var rng = SeededRandom(seed: seed)
        for _ in 0..<150 {
            let length = Int.random(in: 0...min(expected.count, 300_000), using: &rng)
            let offset = Int.random(in: 0...(expected.count - length), using: &rng)
            let got = try source.readBytes(at: UInt64(offset), count: length)
            if got != Array(expected[offset..<offset + length]) {
                Issue.record("read of \(length) bytes at \(offset) differs", sourceLocation: sourceLocation)
                break
            }
        }

        // Concurrent readers share the L2 cache.
        let failures = Locked(0)
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            var rng = SeededRandom(seed: seed &+ UInt64(t) &* 1000)
            for _ in 0..<40 {
                let length = Int.random(in: 1...min(expected.count, 200_000), using: &rng)
                let offset = Int.random(in: 0...(expected.count - length), using: &rng)
                let ok = (try? source.readBytes(at: UInt64(offset), count: length)) == Array(expected[offset..<offset + length])
                if !ok { failures.withLock { $0 += 1 } }
            }
        }
        #expect(failures.withLock { $0 } == 0, "concurrent reads differ", sourceLocation: sourceLocation)

        let extents = try source.allExtents()
        try checkExtents(extents, cover: source.size, zeroOutsideDataIn: expected, sourceLocation: sourceLocation)
        if let path {
            #expect(extents == (try qemuMap(path)), "extents differ from qemu-img map", sourceLocation: sourceLocation)
        }
    }

    /// Where two byte arrays first differ (nil if equal); keeps failure messages short.
    static func difference(_ a: [UInt8], _ b: [UInt8]) -> String? {
        if a == b { return nil }
        guard a.count == b.count else { return "sizes \(a.count) and \(b.count)" }
        let i = a.indices.first { a[$0] != b[$0] } ?? 0
        return "first difference at byte \(i): \(a[i]) vs \(b[i])"
    }

    static func checkExtents(_ extents: [Extent], cover size: UInt64, zeroOutsideDataIn expected: [UInt8],
                             sourceLocation: SourceLocation = #_sourceLocation) throws {
        var pos: UInt64 = 0
        for e in extents {
            #expect(e.offset == pos && e.length > 0, "extents must cover the disk in order: \(e) at \(pos)", sourceLocation: sourceLocation)
            if e.kind != .data {
                let ok = expected[Int(e.offset)..<Int(e.end)].allSatisfy { $0 == 0 }
                #expect(ok, "non-zero bytes inside \(e)", sourceLocation: sourceLocation)
            }
            pos = e.end
        }
        #expect(pos == size, "extents end at \(pos), disk size \(size)", sourceLocation: sourceLocation)
        #expect(extents == extents.coalesced(), "extents are not coalesced", sourceLocation: sourceLocation)
    }

    /// Stores big-endian integers into a byte array (for hand-made malformed images).
    static func put<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.bigEndian) { raw in
            for (i, b) in raw.enumerated() { bytes[offset + i] = b }
        }
    }

    static func get64(_ bytes: [UInt8], at offset: Int) -> UInt64 {
        bytes[offset..<offset + 8].reduce(0) { $0 << 8 | UInt64($1) }
    }

    static func get32(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        bytes[offset..<offset + 4].reduce(0) { $0 << 8 | UInt32($1) }
    }
}

