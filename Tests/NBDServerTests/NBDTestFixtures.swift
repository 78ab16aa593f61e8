import CairnCore
import CairnTestSupport
import Foundation
import Synchronization

@testable import NBDServer

/// The test disk: 32 MiB with random data, a pattern region, explicit zero extents, holes
/// (unallocated), and a zero-filled stretch the map calls data.
enum NBDFixture {
    static let mib = 1 << 20
    static let size = 32 * mib
    /// Byte of the pattern region [6, 10) MiB: constant within each 64 KiB block.
    static func patternByte(at offset: Int) -> UInt8 { UInt8(offset / 65536 % 250 + 1) }

    static let layout: [(Range<Int>, ExtentKind)] = [
        (0..<4, .data), (4..<6, .zero), (6..<10, .data), (10..<16, .unallocated),
        (16..<17, .data), (17..<20, .zero), (20..<31, .data), (31..<32, .unallocated),
    ]

    static let bytes: [UInt8] = {
        var rng = SeededRandom(seed: 4)
        var b = rng.bytes(size)
        for (r, kind) in layout where kind != .data {
            for i in r.lowerBound * mib..<r.upperBound * mib { b[i] = 0 }
        }
        for i in 6 * mib..<10 * mib { b[i] = patternByte(at: i) }
        for i in 16 * mib..<17 * mib { b[i] = 0x5A }
        for i in 24 * mib..<25 * mib { b[i] = 0 }  // zeros the map reports as data
        return b
    }()

    static let extents: [Extent] = layout.map {
        Extent(offset: UInt64($0.0.lowerBound * mib), length: UInt64($0.0.count * mib), kind: $0.1)
    }

    /// The map `nbdinfo --map` must show for the memory export: (offset, length, is hole).
    static let expectedMap: [MapEntry] = coalesce(extents.map { MapEntry(offset: $0.offset, length: $0.length, hole: !$0.kind.needsRead) })

    /// The map of the zero-scanning export: holes exactly where 64 KiB blocks are all zero.
    static let expectedScanMap: [MapEntry] = coalesce([4..<6, 10..<16, 17..<20, 24..<25, 31..<32].map {
        MapEntry(offset: UInt64($0.lowerBound * mib), length: UInt64($0.count * mib), hole: true)
    } + [0..<4, 6..<10, 16..<17, 20..<24, 25..<31].map {
        MapEntry(offset: UInt64($0.lowerBound * mib), length: UInt64($0.count * mib), hole: false)
    })

    static func exports() -> [NBDExport] {
        [
            NBDExport(name: "disk", description: "test disk (memory)", source: MemoryBlockSource(bytes, name: "disk", extents: extents)),
            NBDExport(name: "scan", description: "test disk (zero scan)", source: ZeroScanningSource(bytes: bytes)),
            NBDExport(name: "rw", description: "scratch", source: MemoryBlockSource([]), writable: MemoryDevice(size: 8 * mib)),
        ]
    }
}

struct MapEntry: Equatable, CustomStringConvertible {
    var offset: UInt64
    var length: UInt64
    var hole: Bool
    var description: String { "\(hole ? "hole" : "data")[\(offset)+\(length)]" }
}

func coalesce(_ entries: [MapEntry]) -> [MapEntry] {
    var out: [MapEntry] = []
    for e in entries.sorted(by: { $0.offset < $1.offset }) where e.length > 0 {
        if let last = out.last, last.hole == e.hole, last.offset + last.length == e.offset {
            out[out.count - 1].length += e.length
        } else {
            out.append(e)
        }
    }
    return out
}

/// A source whose map calls every all-zero 64 KiB block `.zero`.
struct ZeroScanningSource: BlockSource {
    let bytes: [UInt8]
    var size: UInt64 { UInt64(bytes.count) }
    var name: String { "zero-scan" }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
    }

    func extents(in range: Range<UInt64>) throws -> [Extent] {
        let block: UInt64 = 65536
        var out: [Extent] = []
        var at = range.lowerBound
        while at < min(range.upperBound, size) {
            let end = min((at / block + 1) * block, range.upperBound, size)
            let zero = bytes[Int(at)..<Int(end)].allSatisfy { $0 == 0 }
            out.append(Extent(offset: at, length: end - at, kind: zero ? .zero : .data))
            at = end
        }
        return out.coalesced()
    }
}

/// A writable in-memory disk.
final class MemoryDevice: NBDWritableDevice {
    let storage: Mutex<[UInt8]>
    let size: UInt64
    var name: String { "memory-device" }

    init(size: Int) {
        self.size = UInt64(size)
        storage = Mutex([UInt8](repeating: 0, count: size))
    }

    var snapshot: [UInt8] { storage.withLock { $0 } }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        storage.withLock { s in
            s.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
        }
    }

    func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        return range.lowerBound < end ? [Extent(offset: range.lowerBound, length: end - range.lowerBound, kind: .data)] : []
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, bytes.count)
        storage.withLock { s in s.replaceSubrange(Int(offset)..<Int(offset) + bytes.count, with: bytes) }
    }

    func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try checkRange(offset, Int(length))
        storage.withLock { s in for i in Int(offset)..<Int(offset + length) { s[i] = 0 } }
    }

    func trim(at offset: UInt64, length: UInt64) throws {
        try writeZeroes(at: offset, length: length)
    }

    func flush() throws {}
}

/// A running server on a unix socket in a fresh directory, shut down by `stop()`.
final class RunningServer {
    let dir: TempDir
    let socket: String
    let server: NBDServer

    init(exports: [NBDExport] = NBDFixture.exports(), options: NBDServerOptions = .init()) throws {
        dir = try TempDir("nbd")
        socket = dir.file("nbd.sock")
        server = NBDServer(exports: exports, options: options)
        try server.listen(unixSocket: socket)
    }

    func uri(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(socket)" }

    deinit { server.shutdown() }
}

/// The output of `nbdinfo --map`, coalesced: hole = "hole" in the description.
func nbdinfoMap(_ uri: String) throws -> [MapEntry] {
    let out = try Tool.run("nbdinfo", ["--map", uri]).stdout
    var entries: [MapEntry] = []
    for line in out.split(separator: "\n") {
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        guard f.count >= 3, let offset = UInt64(f[0]), let length = UInt64(f[1]), let type = UInt32(f[2]) else { continue }
        entries.append(MapEntry(offset: offset, length: length, hole: type & 1 != 0))
    }
    return coalesce(entries)
}
