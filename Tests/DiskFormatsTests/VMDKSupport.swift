import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import DiskFormats

/// Helpers for the VMDK tests: opening images with extents next to the descriptor, an
/// in-memory `RandomAccessFile`, and the qemu-img referees.
enum VMDKFixture {
    /// Opens a VMDK whose extent files sit in the same directory; records requested names.
    static func open(_ path: String, calls: Locked<[String]>? = nil) throws -> VMDKImage {
        let dir = (path as NSString).deletingLastPathComponent
        return try VMDKImage(file: FileBlockSource(path: path)) { name in
            calls?.withLock { $0.append(name) }
            return try FileBlockSource(path: (dir as NSString).appendingPathComponent(name))
        }
    }

    /// Opens an in-memory image; extents come from `files` (by name), others are not found.
    static func open(_ bytes: [UInt8], name: String = "mem.vmdk", files: [String: [UInt8]] = [:],
                     calls: Locked<[String]>? = nil) throws -> VMDKImage {
        try VMDKImage(file: MemoryBlockSource(bytes, name: name)) { extentName in
            calls?.withLock { $0.append(extentName) }
            guard let data = files[extentName] else {
                throw CairnError(.notFound, "no such file", path: extentName)
            }
            return MemoryBlockSource(data, name: extentName)
        }
    }

    /// `qemu-img check` must report no errors.
    static func expectCheckPasses(_ path: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let check = try Tool.run("qemu-img", ["check", "-f", "vmdk", path], check: false)
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)", sourceLocation: sourceLocation)
        #expect(check.stdout.contains("No errors were found"), "qemu-img check: \(check.stdout) \(check.stderr)", sourceLocation: sourceLocation)
    }

    /// Little-endian stores into a byte array (for hand-made malformed images).
    static func putLE<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { raw in
            for (i, b) in raw.enumerated() { bytes[offset + i] = b }
        }
    }

    static func getLE64(_ bytes: [UInt8], at offset: Int) -> UInt64 {
        bytes[offset..<offset + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    static func getLE32(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        bytes[offset..<offset + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) }
    }

    /// A small image made by one of our writers, in memory.
    static func written(stream: Bool, size: Int, seed: UInt64) throws -> (image: [UInt8], data: [UInt8]) {
        let file = MemoryFile(name: stream ? "s.vmdk" : "m.vmdk")
        let sink: any BlockSink = stream
            ? try VMDKStreamOptimizedWriter(file: file, virtualSize: UInt64(size))
            : try VMDKSparseWriter(file: file, virtualSize: UInt64(size))
        let data = Fixture.pattern(size: size, seed: seed, segments: 8)
        try data.withUnsafeBytes { try sink.write($0, at: 0) }
        try sink.finish()
        return (file.contents, data)
    }
}

/// An in-memory `RandomAccessFile` for writer tests that need no qemu-img.
final class MemoryFile: RandomAccessFile, @unchecked Sendable {
    // @unchecked: all state behind `lock`.
    let name: String
    private var bytes: [UInt8] = []
    private let lock = NSLock()

    init(name: String) { self.name = name }

    var contents: [UInt8] { lock.withLock { bytes } }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        lock.withLock {
            let end = Int(offset) + buffer.count
            if bytes.count < end { bytes += [UInt8](repeating: 0, count: end - bytes.count) }
            bytes.withUnsafeMutableBytes { dst in
                UnsafeMutableRawBufferPointer(rebasing: dst[Int(offset)..<end]).copyMemory(from: buffer)
            }
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try lock.withLock {
            guard Int(offset) + buffer.count <= bytes.count else { throw CairnError(.io, "short read", path: name) }
            bytes.withUnsafeBytes { src in
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(offset)..<Int(offset) + buffer.count]))
            }
        }
    }

    func setLength(_ length: UInt64) throws {
        lock.withLock {
            if bytes.count > Int(length) { bytes.removeLast(bytes.count - Int(length)) } else {
                bytes += [UInt8](repeating: 0, count: Int(length) - bytes.count)
            }
        }
    }

    func sync() throws {}
}
