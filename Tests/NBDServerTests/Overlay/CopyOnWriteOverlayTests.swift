import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import NBDServer

@Suite("Copy-on-write overlay")
struct CopyOnWriteOverlayTests {
    /// Random writes, zeroes and trims of random sizes against a model; after each step a
    /// random read (and the allocation map) must agree with the model; after a flush and a
    /// reopen everything must still agree; the base file is never modified.
    @Test("random writes, zeroes and trims match a model, survive flush + reopen, and never touch the base", arguments: [512, 4096, 65536])
    func matchesModel(blockSize: Int) throws {
        let dir = try TempDir("overlay")
        var rng = SeededRandom(seed: UInt64(blockSize))
        let size = 3 * 1024 * 1024 + 1000
        var model = rng.bytes(size)
        for z in stride(from: 0, to: size, by: 200_000) { for i in z..<min(z + 50_000, size) { model[i] = 0 } }
        let basePath = dir.file("base.raw")
        #expect(FileManager.default.createFile(atPath: basePath, contents: Data(model)))
        let original = model
        let base = try FileBlockSource(path: basePath)
        let path = dir.file("disk.overlay")
        var overlay = try CopyOnWriteOverlay.create(path: path, base: base, identity: "snap:disk0", blockSize: blockSize)
        for step in 0..<400 {
            let offset = Int.random(in: 0..<size, using: &rng)
            let length = Int.random(in: 1...min(size - offset, 3 * blockSize + 17), using: &rng)
            switch Int.random(in: 0..<10, using: &rng) {
            case 0..<6:
                let data = rng.bytes(length)
                try data.withUnsafeBytes { try overlay.write($0, at: UInt64(offset)) }
                model.replaceSubrange(offset..<offset + length, with: data)
            case 6..<8:
                try overlay.writeZeroes(at: UInt64(offset), length: UInt64(length))
                for i in offset..<offset + length { model[i] = 0 }
            case 8:
                try overlay.trim(at: UInt64(offset), length: UInt64(length))
                for i in offset..<offset + length { model[i] = 0 }
            default:
                try overlay.flush()
            }
            let ro = Int.random(in: 0..<size, using: &rng)
            let rl = Int.random(in: 0...(size - ro), using: &rng)
            let got = try overlay.readBytes(at: UInt64(ro), count: rl)
            #expect(got == Array(model[ro..<ro + rl]), "step \(step): read \(ro)+\(rl)")
            if step % 50 == 0 {
                try checkExtents(overlay, model)
            }
        }
        try overlay.close()
        #expect(throws: CairnError.self) { try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try overlay.write($0, at: 0) } }
        overlay = try CopyOnWriteOverlay.open(path: path, base: base, identity: "snap:disk0")
        #expect(try overlay.readBytes(at: 0, count: size) == model, "the reopened overlay shows every flushed write")
        try checkExtents(overlay, model)
        #expect(FileManager.default.contents(atPath: basePath) == Data(original), "the base is never modified")
        #expect(overlay.changedBytes > 0)
    }

    private func checkExtents(_ overlay: CopyOnWriteOverlay, _ model: [UInt8]) throws {
        var pos: UInt64 = 0
        for e in try overlay.extents(in: 0..<overlay.size) {
            #expect(e.offset == pos)
            pos = e.end
            if e.kind != .data {
                #expect(model[Int(e.offset)..<Int(e.end)].allSatisfy { $0 == 0 }, "\(e) must read as zeros")
            }
        }
        #expect(pos == overlay.size)
    }

    @Test("unflushed writes may be lost at a crash, flushed ones never; no block ever shows data that was not written")
    func crashBeforeFlush() throws {
        let dir = try TempDir("overlay-crash")
        let base = MemoryBlockSource([UInt8](repeating: 0x11, count: 1 << 20), name: "base")
        let path = dir.file("o")
        let o = try CopyOnWriteOverlay.create(path: path, base: base, identity: "id", blockSize: 4096)
        try [UInt8](repeating: 0xAA, count: 8192).withUnsafeBytes { try o.write($0, at: 0) }
        try o.flush()
        try [UInt8](repeating: 0xBB, count: 4096).withUnsafeBytes { try o.write($0, at: 65536) }
        // "Crash": open the file again without flushing or closing the first handle.
        let again = try CopyOnWriteOverlay.open(path: path, base: base, identity: "id")
        #expect(try again.readBytes(at: 0, count: 8192) == [UInt8](repeating: 0xAA, count: 8192))
        #expect(try again.readBytes(at: 65536, count: 4096) == [UInt8](repeating: 0x11, count: 4096), "the unflushed write is lost, the base shows")
    }

    @Test("an overlay is refused for another base, and damaged headers are refused")
    func refusals() throws {
        let dir = try TempDir("overlay-refuse")
        let base = MemoryBlockSource([UInt8](repeating: 1, count: 1 << 16), name: "base")
        let path = dir.file("o")
        try CopyOnWriteOverlay.create(path: path, base: base, identity: "snapA:disk0").close()
        #expect { try CopyOnWriteOverlay.open(path: path, base: base, identity: "snapB:disk0") } throws: { e in
            (e as? CairnError)?.message.contains("belongs to snapA:disk0") ?? false
        }
        #expect(throws: CairnError.self) {
            try CopyOnWriteOverlay.open(path: path, base: MemoryBlockSource([UInt8](repeating: 1, count: 1 << 17), name: "b2"), identity: "snapA:disk0")
        }
        #expect(throws: CairnError.self) { try CopyOnWriteOverlay.create(path: path, base: base, identity: "x") }   // exists
        let f = try PosixFile(path: path, flags: O_RDWR)
        try [UInt8](repeating: 0xFF, count: 4).withUnsafeBytes { try f.pwrite($0, at: 12) }   // block size
        #expect(throws: CairnError.self) { try CopyOnWriteOverlay.open(path: path, base: base, identity: "snapA:disk0") }
        try Array("NOTCOW!!".utf8).withUnsafeBytes { try f.pwrite($0, at: 0) }
        #expect { try CopyOnWriteOverlay.open(path: path, base: base, identity: "snapA:disk0") } throws: { e in
            (e as? CairnError)?.message.contains("bad magic") ?? false
        }
    }
}
