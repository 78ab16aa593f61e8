import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

@Suite struct NTFSFileSystemTests {
    @Test func probeAndVolumeFieldsMatchBlkid() throws {
        let img = try NTFSRichImage.get()
        let source = try FileBlockSource(path: img.path)
        #expect(NTFSFileSystem.probe(source))
        let fs = try NTFSFileSystem(volume: source)
        #expect(fs.typeName == "ntfs")
        #expect(fs.blockSize == 4096)
        #expect(fs.rootNode == 5)
        let blkid = try Tool.run("blkid", ["-o", "export", img.path]).stdout
        #expect(blkid.contains("TYPE=ntfs"))
        #expect(blkid.contains("UUID=\(fs.uuid ?? "none")\n"), "\(blkid) vs \(fs.uuid ?? "nil")")
        #expect(fs.label == "CairnNTFS")
        #expect(!NTFSFileSystem.probe(MemoryBlockSource([UInt8](repeating: 0, count: 4096))))
        #expect(!NTFSFileSystem.probe(MemoryBlockSource([0x4E])))
        try Tool.run("ntfsfix", ["-n", img.path])
    }

    @Test func listingMatchesNtfsls() throws {
        let img = try NTFSRichImage.get()
        let fs = try NTFSFileSystem(volume: try FileBlockSource(path: img.path))
        let ours = try NTFSTestSupport.listing(fs)
        let ref = try NTFSTestSupport.ntfsls(img.path)
        #expect(ref.count > 450)
        #expect(Set(ours.keys) == Set(ref.keys), "only ours: \(Set(ours.keys).subtracting(ref.keys).sorted()), only ntfsls: \(Set(ref.keys).subtracting(ours.keys).sorted())")
        for (path, r) in ref {
            guard let (entry, meta) = ours[path] else { continue }
            #expect(entry.node == r.node, "\(path)")
            #expect((meta.kind == .directory) == r.isDirectory, "\(path)")
            // ntfsls shows an Interix symlink's own data size; we show the target length.
            if meta.kind != .symlink { #expect(meta.size == r.size, "\(path): \(meta.size) vs \(r.size)") }
        }
        // The B-tree walk returns entries in collation order, as ntfsls does.
        let many = try fs.directory(fs.lookup("/many"))
        #expect(many.count == 400)
        #expect(many.map(\.name) == many.map(\.name).sorted())
        // System files stay hidden.
        #expect(try fs.directory(fs.rootNode).allSatisfy { !$0.name.hasPrefix("$") && $0.node >= 16 })
    }

    @Test func treeMatchesWhatWasWritten() throws {
        let img = try NTFSRichImage.get()
        let fs = try NTFSFileSystem(volume: try FileBlockSource(path: img.path))
        let ours = try NTFSTestSupport.listing(fs)
        #expect(Set(ours.keys) == Set(img.expected.keys),
                "only ours: \(Set(ours.keys).subtracting(img.expected.keys).sorted()), only written: \(Set(img.expected.keys).subtracting(ours.keys).sorted())")
        for (path, want) in img.expected {
            guard let (entry, meta) = ours[path] else { continue }
            switch want {
            case .directory:
                #expect(meta.kind == .directory, "\(path)")
                #expect(meta.permissions == 0o755)
            case .file(let bytes):
                #expect(meta.kind == .regular, "\(path)")
                #expect(meta.size == UInt64(bytes.count), "\(path)")
                let got = try NTFSTestSupport.readAll(fs, entry.node)
                let same = got == bytes
                #expect(same, "\(path): content differs")
                // Unaligned small reads agree too.
                if bytes.count > 70_000 {
                    var piece = [UInt8](repeating: 0, count: 5000)
                    let n = try piece.withUnsafeMutableBytes { try fs.read(entry.node, into: $0, at: 65_000) }
                    #expect(n == 5000 && piece == Array(bytes[65_000..<70_000]), "\(path): unaligned read differs")
                }
            case .sparse(let size, let offset, let bytes):
                #expect(meta.kind == .regular && meta.size == size, "\(path)")
                var piece = [UInt8](repeating: 0xEE, count: bytes.count + 200)
                let n = try piece.withUnsafeMutableBytes { try fs.read(entry.node, into: $0, at: offset - 100) }
                #expect(n == piece.count)
                #expect(piece[0..<100].allSatisfy { $0 == 0 } && Array(piece[100..<100 + bytes.count]) == bytes
                        && piece[(100 + bytes.count)...].allSatisfy { $0 == 0 }, "\(path): data past 4 GiB differs")
                var tail = [UInt8](repeating: 0xEE, count: 4096)
                #expect(try tail.withUnsafeMutableBytes { try fs.read(entry.node, into: $0, at: size - 1000) } == 1000)
                #expect(tail[0..<1000].allSatisfy { $0 == 0 })
            case .symlink(let target):
                #expect(meta.kind == .symlink, "\(path)")
                #expect(try fs.readLink(entry.node) == target)
                #expect(meta.size == UInt64(target.utf8.count))
            }
        }
        // Hard links: one record, link count.
        let big = try fs.lookup("/big.bin"), hard = try fs.lookup("/docs/hardlink.bin")
        #expect(big == hard)
        #expect(try fs.metadata(of: big).linkCount == 2)
        #expect(try fs.metadata(of: fs.lookup("/links/target.txt")).linkCount == 41)
        // Reads past the end are empty; a symlink is followed by lookup.
        var one = [UInt8](repeating: 0, count: 1)
        #expect(try one.withUnsafeMutableBytes { try fs.read(big, into: $0, at: 1 << 40) } == 0)
        #expect(try fs.lookup("/link-short", followLast: true) == big)
        #expect(try fs.lookup("/docs/up", followLast: true) == fs.lookup("/small.txt"))
        #expect(throws: CairnError.self) { try fs.directory(big) }
        #expect(throws: CairnError.self) { try fs.readLink(big) }
    }

    @Test func featuresReallyUsedAndNtfscatAgrees() throws {
        let img = try NTFSRichImage.get()
        let fs = try NTFSFileSystem(volume: try FileBlockSource(path: img.path))
        // The fixture exercises what it claims to.
        let text = try fs.node(fs.lookup("/compressed/text.txt"))
        guard case .nonResident(let ts)? = text.data else { Issue.record("text.txt not non-resident"); return }
        #expect(ts.isCompressed)
        #expect(ts.runs.contains { $0.lcn == nil }, "no compressed unit in text.txt")
        guard case .nonResident(let sp)? = try fs.node(fs.lookup("/sparse.bin")).data else { Issue.record("sparse.bin"); return }
        #expect(sp.runs.contains { $0.lcn == nil })
        let manyNode = try fs.node(fs.lookup("/many"))
        #expect((manyNode.indexAllocation?.dataSize ?? 0) > 4096 * 2)
        guard case .nonResident(let fr)? = try fs.node(fs.lookup("/fragmented.bin")).data else { Issue.record("fragmented"); return }
        #expect(fr.runs.count > 100)
        let fragRecord = try NTFSFileSystem.readRecord(fs.lookup("/fragmented.bin"), mft: fs.mft, boot: fs.boot, reader: fs.reader)
        #expect(fragRecord.attributes.contains { $0.type == NTFSConstants.attributeList })
        let linksRecord = try NTFSFileSystem.readRecord(fs.lookup("/links/target.txt"), mft: fs.mft, boot: fs.boot, reader: fs.reader)
        #expect(linksRecord.attributes.contains { $0.type == NTFSConstants.attributeList })
        // ntfscat is a second referee for the decoded forms.
        for path in ["/compressed/text.txt", "/compressed/mixed.bin", "/compressed/random.bin", "/fragmented.bin", "/big.bin"] {
            let ref = try Tool.run("ntfscat", [img.path, path]).stdoutData
            let same = try NTFSTestSupport.readAll(fs, fs.lookup(path)) == [UInt8](ref)
            #expect(same, "\(path) differs from ntfscat")
        }
    }

    @Test func metadataTimesAndModes() throws {
        let img = try NTFSRichImage.get()
        let fs = try NTFSFileSystem(volume: try FileBlockSource(path: img.path))
        let dated = try fs.metadata(of: fs.lookup("/docs/dated.txt"))
        #expect(dated.modified == FileTime(seconds: NTFSRichImage.datedSeconds, nanoseconds: NTFSRichImage.datedNanoseconds))
        #expect(dated.permissions == 0o644 && dated.uid == 0 && dated.gid == 0)
        #expect(try fs.metadata(of: fs.lookup("/readonly.txt")).permissions == 0o444)
        // ntfsinfo prints $STANDARD_INFORMATION times to the second.
        let info = try Tool.run("ntfsinfo", ["-F", "/docs/dated.txt", img.path], environment: ["TZ": "UTC"]).stdout
        #expect(info.contains("File Altered Time:\t Fri Jul 14 02:40:00 2017 UTC"), "\(info)")
        let now = Int64(Date().timeIntervalSince1970)
        let small = try fs.metadata(of: fs.lookup("/small.txt"))
        #expect(abs(small.modified.seconds - now) < 3600)
        #expect(small.created != nil)
        #expect(abs(small.changed.seconds - now) < 3600)
    }

    @Test func freeSpaceMatchesNtfsinfoAndAvoidsEverythingInUse() throws {
        let img = try NTFSRichImage.get()
        let fs = try NTFSFileSystem(volume: try FileBlockSource(path: img.path))
        let free = try fs.freeRanges()
        let cs = UInt64(fs.blockSize)
        var last: UInt64 = 0
        for r in free {
            #expect(r.lowerBound >= last && r.upperBound > r.lowerBound)
            #expect(r.lowerBound % cs == 0 && r.upperBound % cs == 0)
            last = r.upperBound
        }
        #expect(last <= fs.volume.size)
        let freeClusters = free.reduce(0) { $0 + ($1.upperBound - $1.lowerBound) } / cs
        #expect(try NTFSTestSupport.ntfsinfoFreeClusters(img.path) == freeClusters)
        // No cluster of any attribute of any record is free, nor the boot sector or the backup.
        let used = try NTFSTestSupport.usedClusters(fs)
        for u in used {
            let bytes = u.lowerBound * cs..<u.upperBound * cs
            #expect(!free.contains { $0.overlaps(bytes) }, "used clusters \(u) are in a free range")
        }
        #expect(!free.contains { $0.contains(fs.volume.size - 512) })
    }

    @Test func plainImagesOfOtherGeometries() throws {
        for (cluster, sector) in [(512, 512), (4096, 512), (65536, 512), (4096, 4096), (2048, 1024)] {
            let dir = try TempDir("ntfs-geo")
            let (image, content) = try NTFSTestSupport.plainImage(in: dir, size: cluster >= 65536 ? "32M" : "8M", clusterSize: cluster, sectorSize: sector)
            let fs = try NTFSFileSystem(volume: try FileBlockSource(path: image))
            #expect(fs.blockSize == cluster)
            #expect(fs.label == "plain")
            let same = try NTFSTestSupport.readAll(fs, fs.lookup("/content.bin")) == content
            #expect(same, "cluster \(cluster): content differs")
            let freeClusters = try fs.freeRanges().reduce(0) { $0 + ($1.upperBound - $1.lowerBound) } / UInt64(cluster)
            #expect(try NTFSTestSupport.ntfsinfoFreeClusters(image) == freeClusters, "cluster \(cluster)")
        }
    }

    @Test func reparsePointTargets() {
        func symlinkData(tag: UInt32, substitute: String, print: String, relative: Bool) -> [UInt8] {
            let sub = Array(substitute.utf16).flatMap { [UInt8($0 & 0xFF), UInt8($0 >> 8)] }
            let prn = Array(print.utf16).flatMap { [UInt8($0 & 0xFF), UInt8($0 >> 8)] }
            var body: [UInt8] = []
            func u16(_ v: Int) { body += [UInt8(v & 0xFF), UInt8(v >> 8)] }
            u16(0); u16(sub.count); u16(sub.count); u16(prn.count)
            if tag == NTFSConstants.tagSymlink { body += [relative ? 1 : 0, 0, 0, 0] }
            body += sub + prn
            return [UInt8(tag & 0xFF), UInt8((tag >> 8) & 0xFF), UInt8((tag >> 16) & 0xFF), UInt8(tag >> 24),
                    UInt8(body.count & 0xFF), UInt8(body.count >> 8), 0, 0] + body
        }
        #expect(NTFSFileSystem.reparseTarget(symlinkData(tag: NTFSConstants.tagSymlink, substitute: "..\\a\\b", print: "..\\a\\b", relative: true)) == "../a/b")
        #expect(NTFSFileSystem.reparseTarget(symlinkData(tag: NTFSConstants.tagSymlink, substitute: "\\??\\C:\\Users\\x", print: "C:\\Users\\x", relative: false)) == "/Users/x")
        #expect(NTFSFileSystem.reparseTarget(symlinkData(tag: NTFSConstants.tagMountPoint, substitute: "\\??\\D:\\data", print: "", relative: false)) == "/data")
        let lx: [UInt8] = [0x1D, 0, 0, 0xA0, 12, 0, 0, 0, 2, 0, 0, 0] + Array("target/x".utf8)
        #expect(NTFSFileSystem.reparseTarget(lx) == "target/x")
        #expect(NTFSFileSystem.reparseTarget([0x0C, 0, 0, 0xA0, 200, 0]) == nil)
        #expect(NTFSFileSystem.reparseTarget([0x17, 0, 0, 0x80, 0, 0, 0, 0]) == nil)
    }

    @Test func lznt1DecodesLiteralsAndBackReferences() throws {
        // "abcabcabcabc" + end: literal a, b, c then a back-reference of 9 bytes, 3 back.
        // Token at position 3: 12 - 0 length bits... position 3 -> 12 length bits: offset 3 -> (2 << 12) | (9 - 3).
        let token = (2 << 12) | 6
        let chunk: [UInt8] = [0x08, UInt8(ascii: "a"), UInt8(ascii: "b"), UInt8(ascii: "c"), UInt8(token & 0xFF), UInt8(token >> 8)]
        let header = 0x8000 | 0x3000 | (chunk.count - 1)
        var out = [UInt8](repeating: 0xEE, count: 4096)
        try LZNT1.decompress([UInt8(header & 0xFF), UInt8(header >> 8)] + chunk + [0, 0], into: &out)
        #expect(Array(out[0..<12]) == Array("abcabcabcabc".utf8))
        #expect(out[12...].allSatisfy { $0 == 0 })
        // A back-reference before the chunk start is an error.
        let bad: [UInt8] = [0x01, 0x00, 0x10]
        let h2 = 0x8000 | (bad.count - 1)
        #expect(throws: CairnError.self) { try LZNT1.decompress([UInt8(h2 & 0xFF), UInt8(h2 >> 8)] + bad, into: &out) }
    }
}
