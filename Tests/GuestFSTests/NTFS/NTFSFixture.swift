import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// What the test wrote into the fixture, by path relative to the root.
enum NTFSExpected: Sendable, Equatable {
    case directory
    case file([UInt8])
    case symlink(String)
    /// A big sparse file: `size` bytes, zeros except `bytes` at `offset`.
    case sparse(size: UInt64, offset: UInt64, bytes: [UInt8])
}

/// A rich NTFS image made once per test run: `mkntfs`, then filled through an `ntfs-3g` FUSE
/// mount (directories, a large directory, compressed, sparse and fragmented files, Interix
/// symlinks, hard links, an attribute list, unicode names, set times and attributes).
final class NTFSRichImage: Sendable {
    let dir: TempDir
    let path: String
    let expected: [String: NTFSExpected]
    /// mtime set on /docs/dated.txt.
    static let datedSeconds: Int64 = 1_500_000_000
    static let datedNanoseconds: UInt32 = 123_456_700

    init(dir: TempDir, path: String, expected: [String: NTFSExpected]) {
        self.dir = dir
        self.path = path
        self.expected = expected
    }

    static let shared: Result<NTFSRichImage, CairnError> = {
        // A static is never deinitialized: remove the image's directory when the test process exits.
        atexit {
            if case .success(let image) = NTFSRichImage.shared { try? FileManager.default.removeItem(atPath: image.dir.path) }
        }
        do { return .success(try build()) } catch let e as CairnError { return .failure(e) } catch {
            return .failure(CairnError(.io, "\(error)"))
        }
    }()

    static func get() throws -> NTFSRichImage { try shared.get() }

    /// Runs `body` with `image` mounted by ntfs-3g (foreground process) at a fresh mount
    /// point; always unmounts and waits for ntfs-3g to finish writing.
    static func withMount(_ image: String, in dir: TempDir, options: String = "compression", _ body: (String) throws -> Void) throws {
        let mnt = dir.file("mnt-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try Tool.which("ntfs-3g"))
        p.arguments = ["-o", "no_detach,\(options)", image, mnt]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer {
            _ = try? Tool.run("fusermount", ["-u", mnt], check: false)
            p.waitUntilExit()
            try? FileManager.default.removeItem(atPath: mnt)
        }
        var parent = stat(), inner = stat()
        var mounted = false
        for _ in 0..<200 {
            if stat(dir.path, &parent) == 0, stat(mnt, &inner) == 0, parent.st_dev != inner.st_dev { mounted = true; break }
            guard p.isRunning else { break }
            usleep(50_000)
        }
        guard mounted else { throw CairnError(.io, "ntfs-3g did not mount \(image)") }
        try body(mnt)
    }

    static func build() throws -> NTFSRichImage {
        let dir = try TempDir("ntfs-rich")
        let image = dir.file("rich.img")
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        try Tool.run("truncate", ["-s", "48M", image])
        try Tool.run("mkntfs", ["-F", "-f", "-q", "-s", "512", "-c", "4096", "-L", "CairnNTFS", image])
        var expected: [String: NTFSExpected] = [:]
        var rng = SeededRandom(seed: 0x4E54_4653)
        try withMount(image, in: dir) { m in
            let fm = FileManager.default
            func mkdir(_ p: String) throws {
                try fm.createDirectory(atPath: m + p, withIntermediateDirectories: false)
                expected[p] = .directory
            }
            func write(_ p: String, _ bytes: [UInt8]) throws {
                guard fm.createFile(atPath: m + p, contents: Data(bytes)) else { throw CairnError(.io, "cannot create \(p)") }
                expected[p] = .file(bytes)
            }
            func setAttributes(_ p: String, _ value: UInt32) throws {
                let be = [UInt8(value >> 24), UInt8((value >> 16) & 0xFF), UInt8((value >> 8) & 0xFF), UInt8(value & 0xFF)]
                let rc = be.withUnsafeBytes { NTFSTestSupport.setxattr(m + p, "system.ntfs_attrib_be", $0.baseAddress, 4, 0) }
                guard rc == 0 else { throw CairnError(.io, "setxattr on \(p) failed: errno \(errno)") }
            }
            try mkdir("/docs")
            try mkdir("/docs/nested")
            try mkdir("/docs/nested/deep")
            try write("/docs/nested/deep/leaf.txt", Array("leaf\n".utf8))
            try write("/docs/dated.txt", Array("dated\n".utf8))
            var times = [timespec(tv_sec: Int(datedSeconds), tv_nsec: Int(datedNanoseconds)),
                         timespec(tv_sec: Int(datedSeconds), tv_nsec: Int(datedNanoseconds))]
            guard utimensat(AT_FDCWD, m + "/docs/dated.txt", &times, 0) == 0 else { throw CairnError(.io, "utimensat failed") }
            try write("/readonly.txt", Array("read only\n".utf8))
            try setAttributes("/readonly.txt", 0x21)
            try write("/empty.txt", [])
            try write("/small.txt", Array("resident data\n".utf8))
            let big = rng.bytes(3 << 20 + 1234)
            try write("/big.bin", big)
            // Hard link: a second name for big.bin.
            try fm.linkItem(atPath: m + "/big.bin", toPath: m + "/docs/hardlink.bin")
            expected["/docs/hardlink.bin"] = .file(big)
            // Many entries: forces $INDEX_ALLOCATION with several INDX blocks.
            try mkdir("/many")
            for i in 0..<400 {
                try write("/many/entry-\(String(format: "%04d", i))-with-a-longer-name.txt", Array("entry \(i)\n".utf8))
            }
            // Unicode names.
            try write("/ünïcødé ✓.txt", Array("unicode\n".utf8))
            try write("/docs/日本語のファイル.txt", Array("japanese\n".utf8))
            // Sparse file: two data blocks in an 8 MiB file.
            let sparseData1 = rng.bytes(4096), sparseData2 = rng.bytes(10000)
            do {
                let fd = open(m + "/sparse.bin", O_CREAT | O_WRONLY, 0o644)
                guard fd >= 0 else { throw CairnError(.io, "open sparse.bin") }
                defer { close(fd) }
                _ = sparseData1.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, 1 << 20) }
                _ = sparseData2.withUnsafeBytes { pwrite(fd, $0.baseAddress, 10000, 5 << 20) }
                guard ftruncate(fd, 8 << 20) == 0 else { throw CairnError(.io, "ftruncate") }
            }
            var sparse = [UInt8](repeating: 0, count: 8 << 20)
            sparse.replaceSubrange((1 << 20)..<(1 << 20) + 4096, with: sparseData1)
            sparse.replaceSubrange((5 << 20)..<(5 << 20) + 10000, with: sparseData2)
            expected["/sparse.bin"] = .file(sparse)
            // A 5 GiB sparse file with data past 4 GiB (sizes and offsets over 32 bits).
            let farData = rng.bytes(5000), farOffset: UInt64 = (4 << 30) + 12345
            do {
                let fd = open(m + "/huge-sparse.bin", O_CREAT | O_WRONLY, 0o644)
                guard fd >= 0 else { throw CairnError(.io, "open huge-sparse.bin") }
                defer { close(fd) }
                guard farData.withUnsafeBytes({ pwrite(fd, $0.baseAddress, 5000, off_t(farOffset)) }) == 5000,
                      ftruncate(fd, 5 << 30) == 0 else { throw CairnError(.io, "writing huge-sparse.bin") }
            }
            expected["/huge-sparse.bin"] = .sparse(size: 5 << 30, offset: farOffset, bytes: farData)
            // Compressed directory: files created in it are LZNT1-compressed.
            try mkdir("/compressed")
            try setAttributes("/compressed", 0x800)
            var text: [UInt8] = []
            for i in 0..<20000 { text += Array("line \(i) of a compressible text file\n".utf8) }
            try write("/compressed/text.txt", text)
            try write("/compressed/random.bin", rng.bytes(200_000))
            var mixed = [UInt8](repeating: 0, count: 300_000)
            mixed.replaceSubrange(100_000..<150_000, with: text[0..<50_000])
            mixed.replaceSubrange(250_000..<260_000, with: rng.bytes(10_000))
            try write("/compressed/mixed.bin", mixed)
            // Fragmented file (interleaved with another): many runs, $DATA in extension records.
            var frag = [UInt8](repeating: 0, count: 300 * 8192)
            do {
                let f = open(m + "/fragmented.bin", O_CREAT | O_WRONLY, 0o644)
                let g = open(m + "/interleaved.bin", O_CREAT | O_WRONLY, 0o644)
                guard f >= 0, g >= 0 else { throw CairnError(.io, "open fragmented.bin") }
                defer { close(f); close(g) }
                var inter: [UInt8] = []
                for i in 0..<300 {
                    let a = rng.bytes(4096), b = rng.bytes(4096)
                    _ = a.withUnsafeBytes { pwrite(f, $0.baseAddress, 4096, off_t(i * 8192)) }
                    frag.replaceSubrange(i * 8192..<i * 8192 + 4096, with: a)
                    _ = b.withUnsafeBytes { pwrite(g, $0.baseAddress, 4096, off_t(i * 4096)) }
                    inter += b
                }
                guard ftruncate(f, off_t(frag.count)) == 0 else { throw CairnError(.io, "ftruncate") }
                expected["/interleaved.bin"] = .file(inter)
            }
            expected["/fragmented.bin"] = .file(frag)
            // Many hard links: the names overflow the record into an $ATTRIBUTE_LIST.
            try mkdir("/links")
            try write("/links/target.txt", Array("linked\n".utf8))
            for i in 0..<40 {
                let name = "/links/a-long-hard-link-name-number-\(String(format: "%02d", i)).txt"
                try fm.linkItem(atPath: m + "/links/target.txt", toPath: m + name)
                expected[name] = .file(Array("linked\n".utf8))
            }
            // Symlinks (ntfs-3g writes them as Interix files).
            let longTarget = "/a/rather/long/target/" + String(repeating: "segment-", count: 30) + "end"
            for (p, t) in [("/link-short", "big.bin"), ("/link-long", longTarget), ("/docs/up", "../small.txt")] {
                try fm.createSymbolicLink(atPath: m + p, withDestinationPath: t)
                expected[p] = .symlink(t)
            }
        }
        return NTFSRichImage(dir: dir, path: image, expected: expected)
    }
}

/// Helpers shared by the NTFS tests.
enum NTFSTestSupport {
    /// setxattr(2), looked up at run time (Glibc's module map leaves out sys/xattr.h).
    static func setxattr(_ path: String, _ name: String, _ value: UnsafeRawPointer?, _ size: Int, _ flags: Int32) -> Int32 {
        typealias Fn = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeRawPointer?, Int, Int32) -> Int32
        guard let sym = dlsym(nil, "setxattr") else { return -1 }
        return unsafeBitCast(sym, to: Fn.self)(path, name, value, size, flags)
    }

    /// A small plain image made with mkntfs and ntfscp only (no mount).
    static func plainImage(in dir: TempDir, size: String = "8M", clusterSize: Int = 4096, sectorSize: Int = 512) throws -> (String, [UInt8]) {
        let image = dir.file("plain.img")
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        try Tool.run("truncate", ["-s", size, image])
        try Tool.run("mkntfs", ["-F", "-f", "-q", "-s", "\(sectorSize)", "-c", "\(clusterSize)", "-L", "plain", image])
        var rng = SeededRandom(seed: UInt64(clusterSize))
        let content = rng.bytes(300_000)
        let src = dir.file("content.bin")
        #expect(FileManager.default.createFile(atPath: src, contents: Data(content)))
        try Tool.run("ntfscp", ["-f", image, src, "content.bin"])
        return (image, content)
    }

    static func readAll(_ fs: NTFSFileSystem, _ node: UInt64, piece: Int = 1 << 20) throws -> [UInt8] {
        let size = Int(try fs.metadata(of: node).size)
        var out = [UInt8](repeating: 0, count: size)
        var done = 0
        try out.withUnsafeMutableBytes { buf in
            while done < size {
                let end = min(size, done + piece)
                let n = try fs.read(node, into: UnsafeMutableRawBufferPointer(rebasing: buf[done..<end]), at: UInt64(done))
                if n == 0 { break }
                done += n
            }
        }
        #expect(done == size)
        return out
    }

    /// Every entry of the tree: path -> (entry, metadata).
    static func listing(_ fs: NTFSFileSystem) throws -> [String: (DirectoryEntry, FileMetadata)] {
        var out: [String: (DirectoryEntry, FileMetadata)] = [:]
        try fs.walk { path, entry, meta in out[path] = (entry, meta) }
        return out
    }

    /// `ntfsls -R -l -F -i` parsed: path -> (record, size, isDirectory).
    static func ntfsls(_ image: String) throws -> [String: (node: UInt64, size: UInt64, isDirectory: Bool)] {
        let out = try Tool.run("ntfsls", ["-R", "-l", "-F", "-i", image], environment: ["TZ": "UTC", "LC_ALL": "C.UTF-8"]).stdout
        var result: [String: (node: UInt64, size: UInt64, isDirectory: Bool)] = [:]
        var current = ""
        for line in out.split(separator: "\n", omittingEmptySubsequences: true) {
            if line.hasPrefix("/") && line.hasSuffix(":") {
                current = String(line.dropLast())
                if current.hasSuffix("/") { current.removeLast() }
                continue
            }
            // "  inode  size Mon DD HH:MM YYYY name"
            let fields = line.split(separator: " ", maxSplits: 6, omittingEmptySubsequences: true)
            guard fields.count == 7, let node = UInt64(fields[0]), let size = UInt64(fields[1]) else { continue }
            var name = String(fields[6])
            let isDir = name.hasSuffix("/")
            if isDir { name.removeLast() }
            if name == "." || name == ".." { continue }
            result[current + "/" + name] = (node, size, isDir)
        }
        return result
    }

    /// Free clusters as `ntfsinfo -m` reports them.
    static func ntfsinfoFreeClusters(_ image: String) throws -> UInt64? {
        let out = try Tool.run("ntfsinfo", ["-m", image]).stdout
        guard let line = out.split(separator: "\n").first(where: { $0.contains("Free Clusters:") }) else { return nil }
        return line.split(separator: ":")[1].split(separator: " ").first.flatMap { UInt64($0) }
    }

    /// Clusters in use by any attribute of any in-use MFT record (all streams, named or not,
    /// and every extent), plus the boot sector's cluster 0.
    static func usedClusters(_ fs: NTFSFileSystem) throws -> [Range<UInt64>] {
        var used: [Range<UInt64>] = [0..<1]
        let records = fs.mft.dataSize / UInt64(fs.boot.recordSize)
        for n in 0..<records {
            guard let rec = try? NTFSFileSystem.readRecord(n, mft: fs.mft, boot: fs.boot, reader: fs.reader), rec.inUse else { continue }
            for a in rec.attributes where a.resident == nil {
                for r in a.runs { if let l = r.lcn { used.append(l..<l + r.length) } }
            }
        }
        return used
    }
}
