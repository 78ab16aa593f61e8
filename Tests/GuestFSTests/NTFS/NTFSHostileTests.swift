import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// Damaged and hostile images: each must give a CairnError (or a bounded walk), never a trap
/// or a hang.
@Suite struct NTFSHostileTests {
    /// Opens, walks, reads and maps free space; every failure must be a CairnError.
    /// Returns the errors seen.
    @discardableResult
    static func exercise(_ volume: any BlockSource) -> [CairnError] {
        var errors: [CairnError] = []
        func note(_ e: any Error) {
            if let c = e as? CairnError { errors.append(c) } else { Issue.record("not a CairnError: \(e)") }
        }
        let fs: NTFSFileSystem
        do { fs = try NTFSFileSystem(volume: volume) } catch { note(error); return errors }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buffer.deallocate() }
        do {
            try fs.walk(maxEntries: 5000) { _, entry, meta in
                do {
                    switch meta.kind {
                    case .regular: _ = try fs.read(entry.node, into: buffer, at: 0)
                    case .symlink: _ = try fs.readLink(entry.node)
                    default: break
                    }
                } catch { note(error) }
            }
        } catch { note(error) }
        do {
            var last: UInt64 = 0
            for r in try fs.freeRanges() {
                #expect(r.lowerBound >= last && r.upperBound <= volume.size)
                last = r.upperBound
            }
        } catch { note(error) }
        return errors
    }

    static func plain() throws -> (TempDir, [UInt8], NTFSFileSystem) {
        let dir = try TempDir("ntfs-hostile")
        let (image, _) = try NTFSTestSupport.plainImage(in: dir)
        let bytes = try readFile(image)
        return (dir, bytes, try NTFSFileSystem(volume: MemoryBlockSource(bytes)))
    }

    /// Byte offset in the image of MFT record `n`.
    static func recordOffset(_ fs: NTFSFileSystem, _ n: UInt64) -> Int {
        Int(NTFSFileSystem.physicalOffset(fs.mft, n * UInt64(fs.boot.recordSize), clusterSize: fs.boot.clusterSize) ?? 0)
    }

    static func put(_ v: UInt64, _ width: Int, at o: Int, in b: inout [UInt8]) {
        for i in 0..<width { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }

    static func expectMalformed(_ what: String, _ body: () throws -> Void) {
        do {
            try body()
            Issue.record("\(what): no error")
        } catch let e as CairnError {
            #expect(e.code == .malformedImage || e.code == .unsupported, "\(what): \(e)")
        } catch {
            Issue.record("\(what): not a CairnError: \(error)")
        }
    }

    @Test func badBootSectors() throws {
        let (_, good, _) = try Self.plain()
        var b = good
        b[13] = 3  // sectors per cluster not a power of two
        #expect(!NTFSFileSystem.probe(MemoryBlockSource(b)))
        Self.expectMalformed("sectors per cluster 3") { _ = try NTFSFileSystem(volume: MemoryBlockSource(b)) }
        b = good
        b[64] = 0x7F  // 127 clusters per MFT record
        Self.expectMalformed("huge MFT records") { _ = try NTFSFileSystem(volume: MemoryBlockSource(b)) }
        b = good
        Self.put(1 << 40, 8, at: 48, in: &b)  // MFT LCN far past the end
        #expect(NTFSFileSystem.probe(MemoryBlockSource(b)))
        Self.expectMalformed("MFT past the end") { _ = try NTFSFileSystem(volume: MemoryBlockSource(b)) }
        b = good
        b[3] = UInt8(ascii: "X")
        #expect(!NTFSFileSystem.probe(MemoryBlockSource(b)))
        Self.expectMalformed("no OEM id") { _ = try NTFSFileSystem(volume: MemoryBlockSource(b)) }
    }

    @Test func truncatedImages() throws {
        let (_, good, _) = try Self.plain()
        for size in [0, 100, 511, 512, 4096, 16384, 20000, 65536, 1 << 20, good.count / 2, good.count - 4096] {
            Self.exercise(MemoryBlockSource(Array(good.prefix(size))))
        }
        // Cut inside the MFT (records from 16 KiB on): the files past the cut cannot be read.
        let cut = Self.exercise(MemoryBlockSource(Array(good.prefix(65536))))
        #expect(cut.contains { $0.message.contains("past the end") }, "\(cut)")
    }

    @Test func badFixupAndBadRecordFields() throws {
        let (_, good, fs) = try Self.plain()
        let root = Self.recordOffset(fs, 5)
        var b = good
        b[root + 510] ^= 0xFF  // the first block no longer ends with the update sequence number
        let broken = try NTFSFileSystem(volume: MemoryBlockSource(b))
        Self.expectMalformed("torn root record") { _ = try broken.directory(5) }
        do {
            _ = try broken.metadata(of: 5)
        } catch let e as CairnError {
            #expect(e.message.contains("update sequence") && e.message.contains("record 5"), "\(e)")
            #expect(e.offset == UInt64(root) + 4)
        }
        // A first attribute with length 0.
        b = good
        let first = Int(b[root + 20]) | Int(b[root + 21]) << 8
        Self.put(0, 4, at: root + first + 4, in: &b)
        Self.expectMalformed("attribute length 0") { _ = try NTFSFileSystem(volume: MemoryBlockSource(b)).metadata(of: 5) }
        // Record 0 not a FILE record.
        b = good
        let mft0 = Self.recordOffset(fs, 0)
        b[mft0] = 0
        Self.expectMalformed("no FILE magic in $MFT") { _ = try NTFSFileSystem(volume: MemoryBlockSource(b)) }
        // Node numbers past the MFT and unused records.
        Self.expectMalformed("node past the MFT") { _ = try fs.metadata(of: 1 << 40) }
        let records = fs.mft.dataSize / UInt64(fs.boot.recordSize)
        let unused = (16..<records).first { n in
            (try? NTFSFileSystem.readRecord(n, mft: fs.mft, boot: fs.boot, reader: fs.reader)).map { !$0.inUse } ?? true
        }
        #expect(unused != nil)
        if let unused { Self.expectMalformed("unused record \(unused)") { _ = try fs.metadata(of: unused) } }
    }

    @Test func runlistPastTheVolume() throws {
        let (_, good, fs) = try Self.plain()
        let node = try fs.lookup("/content.bin")
        let rec = try NTFSFileSystem.readRecord(node, mft: fs.mft, boot: fs.boot, reader: fs.reader)
        guard let data = rec.attributes.first(where: { $0.type == NTFSConstants.data }) else { Issue.record("no $DATA"); return }
        var b = good
        let attr = Int(data.volumeOffset)
        let mpo = Int(b[attr + 32]) | Int(b[attr + 33]) << 8
        // One run: 8-byte length field of 1 cluster, 8-byte LCN far past the end.
        b[attr + mpo] = 0x88
        Self.put(1, 8, at: attr + mpo + 1, in: &b)
        Self.put(1 << 50, 8, at: attr + mpo + 9, in: &b)
        b[attr + mpo + 17] = 0
        let fs2 = try NTFSFileSystem(volume: MemoryBlockSource(b))
        Self.expectMalformed("run past the end") { _ = try fs2.readAll(node) }
        // A run header with a 9-byte length field.
        b = good
        b[attr + mpo] = 0x19
        Self.expectMalformed("bad run header") { _ = try NTFSFileSystem(volume: MemoryBlockSource(b)).readAll(node) }
        // Absurd data size with a short runlist: reads past the mapping fail, nothing is allocated up front.
        b = good
        Self.put(1 << 60, 8, at: attr + 48, in: &b)
        Self.put(1 << 60, 8, at: attr + 56, in: &b)
        let fs3 = try NTFSFileSystem(volume: MemoryBlockSource(b))
        #expect(try fs3.metadata(of: node).size == 1 << 60)
        var piece = [UInt8](repeating: 0, count: 4096)
        Self.expectMalformed("read past the mapping") { _ = try piece.withUnsafeMutableBytes { try fs3.read(node, into: $0, at: 1 << 40) } }
    }

    @Test func indexLoopsAndSelfContainingDirectories() throws {
        let img = try NTFSRichImage.get()
        let good = try readFile(img.path)
        let fs = try NTFSFileSystem(volume: MemoryBlockSource(good))
        // /many's $INDEX_ROOT: make every sub-node pointer name the same block.
        let many = try fs.lookup("/many")
        let rec = try NTFSFileSystem.readRecord(many, mft: fs.mft, boot: fs.boot, reader: fs.reader)
        guard let rootAttr = rec.attributes.first(where: { $0.type == NTFSConstants.indexRoot }) else { Issue.record("no root"); return }
        var b = good
        let a = Int(rootAttr.volumeOffset)
        let value = a + (Int(b[a + 20]) | Int(b[a + 21]) << 8)
        var p = value + 16 + Int(NTFSFixtureBytes.u32(b, value + 16))
        var pointers: [Int] = []
        for _ in 0..<100 {
            let len = Int(NTFSFixtureBytes.u16(b, p + 8)), flags = NTFSFixtureBytes.u16(b, p + 12)
            if flags & 1 != 0 { pointers.append(p + len - 8) }
            if flags & 2 != 0 || len == 0 { break }
            p += len
        }
        #expect(pointers.count >= 2, "the large directory's root has sub-nodes")
        for q in pointers.dropFirst() { Self.put(UInt64(NTFSFixtureBytes.u32(b, pointers[0])), 8, at: q, in: &b) }
        let looped = try NTFSFileSystem(volume: MemoryBlockSource(b))
        do {
            _ = try looped.directory(many)
            Issue.record("looping index not detected")
        } catch let e as CairnError {
            #expect(e.message.contains("reached twice"), "\(e)")
        }
        Self.exercise(MemoryBlockSource(b))

        // An index block that points to itself.
        b = good
        guard let alloc = try fs.node(many).indexAllocation, let blockAt = NTFSFileSystem.physicalOffset(alloc, 0, clusterSize: fs.boot.clusterSize) else {
            Issue.record("no allocation"); return
        }
        let blk = Int(blockAt)
        let entries = blk + 24 + Int(NTFSFixtureBytes.u32(b, blk + 24))
        // Turn the first entry's flags into "has sub-node" and point it (its last 8 bytes) at VCN 0.
        let len = Int(NTFSFixtureBytes.u16(b, entries + 8))
        if (entries + len - 8) % 512 < 504 {
            b[entries + 12] |= 1
            Self.put(0, 8, at: entries + len - 8, in: &b)
            let selfLoop = try NTFSFileSystem(volume: MemoryBlockSource(b))
            Self.expectMalformed("index block pointing to itself") { _ = try selfLoop.directory(many) }
        }

        // A directory entry of /docs/nested (its only entry, "deep") that names the directory
        // itself: the walk stays bounded.
        b = good
        let docs = try fs.lookup("/docs/nested")
        let drec = try NTFSFileSystem.readRecord(docs, mft: fs.mft, boot: fs.boot, reader: fs.reader)
        if let droot = drec.attributes.first(where: { $0.type == NTFSConstants.indexRoot }) {
            let da = Int(droot.volumeOffset)
            let dv = da + (Int(b[da + 20]) | Int(b[da + 21]) << 8)
            let e0 = dv + 16 + Int(NTFSFixtureBytes.u32(b, dv + 16))
            #expect((e0 - Self.recordOffset(fs, docs)) % 512 < 500, "entry at \(e0 - Self.recordOffset(fs, docs)) in the record")
            Self.put(docs, 6, at: e0, in: &b)
            let selfDir = try NTFSFileSystem(volume: MemoryBlockSource(b))
            #expect(try selfDir.directory(docs).contains { $0.node == docs })
            var count = 0
            try selfDir.walk { _, _, _ in count += 1 }
            #expect(count < 1000)
        }
    }

    @Test func attributeListNamingAnotherFilesRecord() throws {
        let img = try NTFSRichImage.get()
        let good = try readFile(img.path)
        let fs = try NTFSFileSystem(volume: MemoryBlockSource(good))
        let node = try fs.lookup("/fragmented.bin")
        let rec = try NTFSFileSystem.readRecord(node, mft: fs.mft, boot: fs.boot, reader: fs.reader)
        guard let list = rec.attributes.first(where: { $0.type == NTFSConstants.attributeList }) else {
            Issue.record("fragmented.bin has no $ATTRIBUTE_LIST"); return
        }
        // Where the list's bytes are in the image (in the record, or in its own clusters).
        var b = good
        let value: [UInt8], start: Int
        if let resident = list.resident {
            let a = Int(list.volumeOffset)
            value = resident
            start = a + (Int(b[a + 20]) | Int(b[a + 21]) << 8)
        } else {
            guard case .nonResident(let stream) = try NTFSFileSystem.joinExtents([list], what: "list", reader: fs.reader),
                  let at = NTFSFileSystem.physicalOffset(stream, 0, clusterSize: fs.boot.clusterSize) else {
                Issue.record("cannot locate the $ATTRIBUTE_LIST"); return
            }
            value = try fs.reader.readAll(stream, limit: 1 << 20, what: "list")
            start = Int(at)
        }
        var p = 0
        var patched = false
        while p + 26 <= value.count {
            let len = Int(NTFSFixtureBytes.u16(value, p + 4))
            let ref = UInt64(NTFSFixtureBytes.u32(value, p + 16))
            if ref != node, (start + p + 16) % 512 < 500 {
                Self.put(5, 6, at: start + p + 16, in: &b)  // the root directory's record
                patched = true
                break
            }
            guard len >= 26 else { break }
            p += len
        }
        #expect(patched)
        let broken = try NTFSFileSystem(volume: MemoryBlockSource(b))
        do {
            _ = try broken.metadata(of: node)
            Issue.record("foreign extension record not detected")
        } catch let e as CairnError {
            #expect(e.message.contains("belongs to record"), "\(e)")
        }
        // Pointing at itself is harmless (the base record is read once).
        b = good
        Self.put(node, 6, at: start + p + 16, in: &b)
        Self.exercise(MemoryBlockSource(b))
    }

    @Test func randomCorruptionNeverTraps() throws {
        let (_, good, fs) = try Self.plain()
        var rng = SeededRandom(seed: 7)
        let mftStart = Self.recordOffset(fs, 0)
        let span = 40 * fs.boot.recordSize
        for _ in 0..<300 {
            var b = good
            for _ in 0..<(1 + Int(rng.next() % 8)) {
                let o = mftStart + Int(rng.next() % UInt64(span))
                b[o] = UInt8(truncatingIfNeeded: rng.next())
            }
            Self.exercise(MemoryBlockSource(b))
        }
    }

    @Test func fuzzInputEncodingAndRegressions() throws {
        // A real image in the fuzz target's encoding opens and lists as the image does.
        let (_, good, fs) = try Self.plain()
        var input: [UInt8] = []
        Self.appendLE(UInt64(good.count), 4, to: &input)
        for page in stride(from: 0, to: good.count, by: 4096) where good[page..<page + 4096].contains(where: { $0 != 0 }) {
            Self.appendLE(UInt64(page / 4096), 2, to: &input)
            input += good[page..<page + 4096]
        }
        let decoded = NTFSFuzzInput.volume(from: input)
        #expect(decoded.bytes == good)
        let fs2 = try NTFSFileSystem(volume: decoded)
        #expect(try fs2.directory(5) == fs.directory(5))
        // Every saved crash input replays without trapping.
        let root = URL(fileURLWithPath: #filePath).resolvingSymlinksInPath()
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let dir = root.appendingPathComponent("fuzz/regressions/ntfs").path
        for name in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
            let bytes = try readFile(dir + "/" + name)
            Self.exercise(NTFSFuzzInput.volume(from: bytes))
        }
    }

    static func appendLE(_ v: UInt64, _ width: Int, to out: inout [UInt8]) {
        for i in 0..<width { out.append(UInt8(truncatingIfNeeded: v >> (8 * i))) }
    }
}

enum NTFSFixtureBytes {
    static func u16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
    static func u32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) } }
}
