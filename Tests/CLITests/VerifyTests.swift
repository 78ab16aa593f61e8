import CairnCore
import CairnTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// An MBR disk made with the real tools: p1 ext4 (mke2fs -d from a small tree; 1 KiB blocks,
/// so block group 1 holds a backup superblock) and p2 an empty XFS (mkfs.xfs).
/// `damageSuperblock` zeroes the primary ext superblock's magic (bytes 1080-1081 of p1).
struct VerifyDisk {
    static let size = 342 * MiB
    static let p1 = (start: 1 * MiB, size: 40 * MiB)
    static let p2 = (start: 41 * MiB, size: 300 * MiB)

    static func make(_ path: String, scratch: TempDir, seed: UInt64, damageSuperblock: Bool = false) throws {
        let fm = FileManager.default
        let tree = scratch.file("tree-\(seed)")
        for d in ["etc", "home/user/docs", "var/log"] { try fm.createDirectory(atPath: "\(tree)/\(d)", withIntermediateDirectories: true) }
        var rng = SeededRandom(seed: seed)
        #expect(fm.createFile(atPath: "\(tree)/etc/hostname", contents: Data("verify-vm\n".utf8)))
        #expect(fm.createFile(atPath: "\(tree)/home/user/random.bin", contents: Data(rng.bytes(1536 * KiB))))
        for i in 0..<40 { #expect(fm.createFile(atPath: "\(tree)/home/user/docs/note-\(i).txt", contents: Data("note \(i)\n".utf8))) }
        try fm.createSymbolicLink(atPath: "\(tree)/home/user/host", withDestinationPath: "../../etc/hostname")
        try Tool.run("truncate", ["-s", "\(size)", path])
        let script = "label: dos\nstart=\(p1.start / 512), size=\(p1.size / 512), type=83\nstart=\(p2.start / 512), size=\(p2.size / 512), type=83\n"
        try Tool.run("sfdisk", ["-q", path], stdin: Data(script.utf8))
        let ext = scratch.file("p1-\(seed).ext4")
        try Tool.run("mke2fs", ["-q", "-F", "-t", "ext4", "-b", "1024", "-L", "root", "-d", tree, ext, "\(p1.size / 1024)k"])
        try Tool.run("e2fsck", ["-fn", ext])
        try Tool.run("dd", ["if=\(ext)", "of=\(path)", "bs=1M", "seek=\(p1.start / MiB)", "conv=notrunc,sparse", "status=none"])
        let xfs = scratch.file("p2-\(seed).xfs")
        try Tool.run("truncate", ["-s", "\(p2.size)", xfs])
        try Tool.run("mkfs.xfs", ["-q", "-f", "-L", "data", xfs])
        try Tool.run("dd", ["if=\(xfs)", "of=\(path)", "bs=1M", "seek=\(p2.start / MiB)", "conv=notrunc,sparse", "status=none"])
        try fm.removeItem(atPath: ext)
        try fm.removeItem(atPath: xfs)
        if damageSuperblock {
            try writeBytes([0, 0], to: path, at: UInt64(p1.start + 1024 + 0x38))
        }
    }
}

/// `cairn verify` (docs/VERIFY.md) with the real tools as referees: e2fsck, xfs_repair,
/// fsck.fat and ntfsfix run against our NBD export through nbdfuse. Serialized: each test
/// checks that no FUSE mount, nbdfuse process or temporary directory of a verify is left.
@Suite("cairn verify (CLI)", .serialized)
struct VerifyTests {
    /// The pretty-printed JSON array `verify --json` and `verify --report --json` end with
    /// (progress lines before it are single-line objects).
    static func records(_ r: CLIResult) throws -> [[String: Any]] {
        let lines = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        let start = try #require(lines.firstIndex { $0.hasPrefix("[") }, "no JSON array in \(r)")
        let text = lines[start...].joined(separator: "\n")
        return try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]], "\(r)")
    }

    static func levels(_ record: [String: Any]) -> [[String: Any]] { record["levels"] as? [[String: Any]] ?? [] }

    static func details(_ record: [String: Any], _ level: String) -> [String] {
        levels(record).first { $0.string("level") == level }?["details"] as? [String] ?? []
    }

    /// Nothing of a verify is left behind: no FUSE mount, no nbdfuse or checker process
    /// working in a verify directory, no verify temporary directory.
    static func expectNoLeftovers(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let mounts = try String(contentsOfFile: "/proc/mounts", encoding: .utf8)
        #expect(!mounts.contains("cairn-verify-"), "a FUSE mount is left: \(mounts)", sourceLocation: sourceLocation)
        for pid in try FileManager.default.contentsOfDirectory(atPath: "/proc") where Int(pid) != nil {
            guard let cmd = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { continue }
            let text = String(decoding: cmd.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
            #expect(!text.contains("cairn-verify-"), "process \(pid) is left: \(text)", sourceLocation: sourceLocation)
        }
        for base in Set([NSTemporaryDirectory(), "/tmp"]) {
            let left = (try? FileManager.default.contentsOfDirectory(atPath: base))?.filter { $0.hasPrefix("cairn-verify-") } ?? []
            #expect(left.isEmpty, "temporary directories left in \(base): \(left)", sourceLocation: sourceLocation)
        }
    }

    @Test("A GPT disk (ext4 from mke2fs -d, swap, FAT16, NTFS) passes data and filesystem levels; the record is stored, sealed, and shown")
    func realDiskPasses() throws {
        let env = try CLIEnv("verify-pass")
        try env.expect(0, ["init", "--chunk-size", "256K"])
        let tree = env.file("tree")
        try GuestDisk.writeTree(tree, version: 1)
        let disk = env.file("disk.raw")
        try GuestDisk.make(disk, tree: tree, scratch: env.dir, seed: 11)
        try env.expect(0, ["backup", "--vm", "guest", "sda=\(disk)"])
        let id = try #require(env.snapshots().first?.string("id"))
        #expect(try env.snapshots().first?["verified"] is NSNull, "not verified yet")

        let r = try env.expect(0, ["verify", "--level", "filesystem", "--json", id])
        let record = try #require(Self.records(r).first)
        #expect(record.string("outcome") == "passed" && record.string("level") == "filesystem", "\(record)")
        #expect(Self.levels(record).map { $0.string("outcome") ?? "" } == ["passed", "passed"])
        #expect((record["bad_chunks"] as? [String]) == [])
        let data = Self.details(record, "data")
        #expect(data.first?.hasPrefix("read ") == true && data.contains { $0.contains("disk sda catalog") }, "\(data)")
        let fs = Self.details(record, "filesystem")
        // Every volume walked by Cairn's readers, and every native checker ran and found it clean.
        #expect(fs.contains("disk sda volume p2: swap (nothing to check)"), "\(fs)")
        for (volume, checker) in [("p1", "e2fsck -fn"), ("p3", "fsck.fat -n"), ("p4", "ntfsfix -n")] {
            #expect(fs.contains { $0.hasPrefix("disk sda volume \(volume): \(checker): clean") }, "\(checker) on \(volume): \(fs)")
        }
        // The whole tree of GuestDisk.writeTree: 8 directories and lost+found, 309 files (a hard
        // link counted twice), 2 symlinks; FAT: docs/ and two files; NTFS: one file.
        #expect(fs.contains("disk sda volume p1 (ext4): walked 9 directories, 309 files, 2 symlinks, 0 other"), "\(fs)")
        #expect(fs.contains("disk sda volume p3 (vfat): walked 2 directories, 2 files, 0 symlinks, 0 other"), "\(fs)")
        #expect(fs.contains("disk sda volume p4 (ntfs): walked 1 directory, 1 file, 0 symlinks, 0 other"), "\(fs)")
        try Self.expectNoLeftovers()

        // Stored in the repository, sealed (the repository is encrypted: no plaintext JSON).
        let files = env.repoFiles("verifications")
        #expect(files.count == 1 && files[0].hasPrefix(id + "-"), "\(files)")
        let stored = try readFile(env.file("repo/verifications/\(files[0])"))
        #expect(Array(stored.prefix(4)) == Array("CRNO".utf8) && stored[5] == 4 && stored[7] == 1, "an encrypted object of kind 4")
        #expect(!String(decoding: stored, as: UTF8.self).contains("filesystem"))

        // Shown by snapshots (column and JSON) and by verify --report.
        let verified = try #require(env.snapshots().first?["verified"] as? [String: Any])
        #expect(verified.string("level") == "filesystem" && verified.string("outcome") == "passed", "\(verified)")
        let table = try env.expect(0, ["snapshots"])
        #expect(table.stdout.contains("Verified") && table.stdout.contains("filesystem ok "), "\(table)")
        let report = try Self.records(env.expect(0, ["verify", "--report", "--json"]))
        #expect(report.count == 1 && report[0].string("snapshot") == id && report[0].string("outcome") == "passed", "\(report)")
        #expect((report[0]["latest"] as? Bool) == true)
        let human = try env.expect(0, ["verify", "--report"])
        #expect(human.stdout.contains(String(id.prefix(8))) && human.stdout.contains("filesystem") && human.stdout.contains("passed"), "\(human)")
        try env.expect(0, ["check"])
    }

    @Test("An ext4 whose primary superblock magic was zeroed before backup fails at filesystem level, naming the volume and the damage; the data level still passes")
    func damagedSuperblockFails() throws {
        let env = try CLIEnv("verify-superblock")
        try env.expect(0, ["init", "--chunk-size", "256K"])
        let disk = env.file("disk.raw")
        try VerifyDisk.make(disk, scratch: env.dir, seed: 21, damageSuperblock: true)
        try env.expect(0, ["backup", "--vm", "broken", disk])
        let id = try #require(env.snapshots().first?.string("id"))

        let data = try env.expect(0, ["verify", "--json", id])
        #expect(try Self.records(data).first?.string("outcome") == "passed", "the chunks themselves are intact: \(data)")

        let r = try env.expect(3, ["verify", "--level", "filesystem", "--json", id])
        let record = try #require(Self.records(r).first)
        #expect(record.string("outcome") == "failed" && record.string("failed_level") == "filesystem", "\(record)")
        #expect(Self.levels(record).map { $0.string("outcome") ?? "" } == ["passed", "failed"])
        let reason = record.string("reason") ?? ""
        #expect(reason.hasPrefix("filesystem: disk disk.raw volume p1: the ext4 file system is damaged"), "\(reason)")
        #expect(reason.contains("primary ext superblock") && reason.contains("no ext2/3/4 magic"), "\(reason)")
        #expect(reason.contains("e2fsck -fn exited 4"), "the native checker agrees: \(reason)")
        #expect((record["bad_chunks"] as? [String]) == [], "no chunk is bad")
        // The intact XFS on the same disk is walked and checked clean.
        let fs = Self.details(record, "filesystem")
        #expect(fs.contains { $0.hasPrefix("disk disk.raw volume p2 (xfs): walked") }, "\(fs)")
        #expect(fs.contains { $0.hasPrefix("disk disk.raw volume p2: xfs_repair -n -f: clean") }, "\(fs)")
        try Self.expectNoLeftovers()

        let human = try env.expect(3, ["verify", "--level", "filesystem", id])
        #expect(human.stdout.contains("FAILED at filesystem: disk disk.raw volume p1"), "\(human)")
        let verified = try #require(env.snapshots().first?["verified"] as? [String: Any])
        #expect(verified.string("outcome") == "failed" && verified.string("failed_level") == "filesystem", "\(verified)")
        #expect(try env.expect(0, ["snapshots"]).stdout.contains("filesystem FAILED"))
        // Without the native checkers the damage is still found by Cairn's own readers.
        let own = try env.expect(3, ["verify", "--level", "filesystem", "--no-native-check", "--json", id])
        let ownReason = try Self.records(own).first?.string("reason") ?? ""
        #expect(ownReason.contains("volume p1") && ownReason.contains("superblock") && !ownReason.contains("e2fsck"), "\(ownReason)")
    }

    @Test("A flipped byte in one stored chunk fails at data level naming the chunk and its disk offset; the next backup stores it again and both snapshots verify")
    func flippedChunkFailsAndBackupHeals() throws {
        let env = try CLIEnv("verify-heal")
        // Unencrypted, so that the test can find where a stored chunk's bytes live on the disk.
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "256K"])
        let disk = env.file("disk.raw")
        try VerifyDisk.make(disk, scratch: env.dir, seed: 31)
        try env.expect(0, ["backup", "--vm", "healme", disk])
        let first = try #require(env.snapshots().first?.string("id"))

        // A chunk stored uncompressed (random file data): its payload is the plaintext, so its
        // position on the disk is where those bytes are.
        let chunkSize = 256 * KiB
        let image = try PosixFile(path: disk, flags: O_RDONLY)
        var target: (id: String, path: String, offset: Int, plain: [UInt8])?
        var buffer = [UInt8](repeating: 0, count: chunkSize)
        search: for rel in env.repoFiles("chunks").sorted() {
            let path = env.file("repo/chunks/\(rel)")
            let object = try readFile(path)
            guard object.count == 32 + chunkSize, object[6] == 0 else { continue }
            let plain = Array(object[32...])
            for offset in stride(from: 0, to: VerifyDisk.size, by: chunkSize) {
                try buffer.withUnsafeMutableBytes { try image.read(into: $0, at: UInt64(offset)) }
                if buffer == plain {
                    target = ((rel as NSString).lastPathComponent, path, offset, plain)
                    break search
                }
            }
        }
        let bad = try #require(target, "an uncompressed disk chunk exists")
        var flipped = try readFile(bad.path)
        flipped[32 + 1000] ^= 0xFF
        try FileManager.default.removeItem(atPath: bad.path)
        try Data(flipped).write(to: URL(fileURLWithPath: bad.path))

        let r = try env.expect(3, ["verify", "--json", first])
        let record = try #require(Self.records(r).first)
        #expect(record.string("failed_level") == "data", "\(record)")
        #expect((record["bad_chunks"] as? [String]) == [bad.id], "\(record)")
        let reason = record.string("reason") ?? ""
        #expect(reason.contains(bad.id) && reason.contains("disk disk.raw, byte offset \(bad.offset) "), "\(reason)")
        let human = try env.expect(3, ["verify", first])
        #expect(human.stdout.contains("FAILED at data") && human.stdout.contains(bad.id), "\(human)")
        #expect(try env.expect(0, ["snapshots"]).stdout.contains("data FAILED"))

        // The next backup of the VM does not deduplicate against the bad chunk: it stores it again.
        let b = try env.expect(0, ["backup", "--vm", "healme", "--json", disk])
        let summary = b.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .first { $0.string("type") == "summary" }
        let newBytes = (summary?["disks"] as? [[String: Any]])?.first?.int("bytes_new")
        #expect(newBytes == chunkSize, "exactly the bad chunk is stored again: \(b)")
        let healed = try readFile(bad.path)
        #expect(healed.count == 32 + chunkSize && Array(healed[32...]) == bad.plain, "the chunk file is good again")
        let second = try #require(env.snapshots().last?.string("id"))
        #expect(second != first)
        #expect(try Self.records(env.expect(0, ["verify", "--json", second])).first?.string("outcome") == "passed")
        #expect(try Self.records(env.expect(0, ["verify", "--json", first])).first?.string("outcome") == "passed",
                "the old snapshot uses the same chunk id, now stored intact")
        // No failed snapshot is left: the next backup deduplicates everything again.
        let again = try env.expect(0, ["backup", "--vm", "healme", "--json", disk])
        #expect(again.stdout.contains("\"bytes_new\":0"), "\(again)")
        try env.expect(0, ["check", "--read-data"])
    }

    @Test("--sample reads that share of the chunks; --vm --latest and --all-unverified pick the documented snapshots; prune, gc and check handle records; usage errors are 64")
    func samplingAndPolicy() throws {
        let env = try CLIEnv("verify-policy")
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let disks = (0..<3).map { env.file("d\($0).raw") }
        for (i, d) in disks.enumerated() { try Disk.dense(d, size: 4 * MiB, seed: UInt64(100 + i)) }
        try env.expect(0, ["backup", "--vm", "a", disks[0]])
        try env.expect(0, ["backup", "--vm", "b", disks[1]])
        try env.expect(0, ["backup", "--vm", "a", disks[2]])
        let snaps = try env.snapshots()
        let a1 = try #require(snaps[0].string("id")), b1 = try #require(snaps[1].string("id")), a2 = try #require(snaps[2].string("id"))

        // Usage errors.
        try env.expect(64, ["verify"])
        try env.expect(64, ["verify", "--latest"])
        try env.expect(64, ["verify", "--vm", "a", "--latest", "--all-unverified"])
        try env.expect(64, ["verify", "--level", "bogus", a1])
        try env.expect(64, ["verify", "--sample", "0%", a1])
        try env.expect(64, ["verify", "--sample", "150%", a1])
        try env.expect(64, ["verify", "--level", "boot", "--heartbeat-agent", "--heartbeat-port", "22", a1])
        try env.expect(64, ["verify", "--report", a1])
        try env.expect(64, ["verify", "--evidence", a1])
        #expect(env.repoFiles("verifications").isEmpty, "nothing was recorded by the refused runs")

        // --sample 10%: ceil(10 % of 64 distinct chunks) = 7 are read.
        let sampled = try #require(try Self.records(env.expect(0, ["verify", "--sample", "10%", "--json", a1])).first)
        #expect((sampled["sample"] as? Double) == 0.1, "\(sampled)")
        #expect(Self.details(sampled, "data").first == "read 7 of 64 distinct chunks (448.0 KiB), a random 10% sample", "\(sampled)")
        let all = try #require(try Self.records(env.expect(0, ["verify", "--json", a1])).first)
        #expect(Self.details(all, "data").first == "read 64 of 64 distinct chunks (4.0 MiB)", "\(all)")
        #expect(all["sample"] is NSNull)

        // --vm a --latest: the newest snapshot of a only.
        let latest = try Self.records(env.expect(0, ["verify", "--vm", "a", "--latest", "--json"]))
        #expect(latest.map { $0.string("snapshot") ?? "" } == [a2])
        // --all-unverified: every snapshot without a record at the level or above (here b1).
        let unverified = try Self.records(env.expect(0, ["verify", "--all-unverified", "--json"]))
        #expect(unverified.map { $0.string("snapshot") ?? "" } == [b1])
        #expect(try Self.records(env.expect(0, ["verify", "--all-unverified", "--json"])).isEmpty)
        #expect(try env.expect(0, ["verify", "--all-unverified"]).stdout.contains("nothing to verify"))
        // Data records do not count for the filesystem level; filesystem records count for data.
        let fsAll = try Self.records(env.expect(0, ["verify", "--all-unverified", "--level", "filesystem", "--vm", "a", "--json"]))
        #expect(fsAll.map { $0.string("snapshot") ?? "" } == [a1, a2])
        #expect(Self.details(fsAll[0], "filesystem").contains { $0.contains("no file system recognised") }, "\(fsAll[0])")
        #expect(try Self.records(env.expect(0, ["verify", "--all-unverified", "--level", "filesystem", "--json"])).map { $0.string("snapshot") ?? "" } == [b1])
        #expect(try Self.records(env.expect(0, ["verify", "--all-unverified", "--json"])).isEmpty)

        // The report: every record (a1: 3, a2: 2, b1: 2), newest marked; --vm filters.
        let report = try Self.records(env.expect(0, ["verify", "--report", "--json"]))
        #expect(report.count == 7, "\(report)")
        #expect(report.filter { ($0["latest"] as? Bool) == true }.count == 3)
        let onlyB = try Self.records(env.expect(0, ["verify", "--report", "--vm", "b", "--json"]))
        #expect(onlyB.count == 2 && onlyB.allSatisfy { $0.string("vm") == "b" }, "\(onlyB)")
        let evidence = try env.expect(1, ["verify", "--evidence", a2, "--to", env.file("ev")])
        #expect(evidence.stderr.contains("no verification record with evidence"), "\(evidence)")

        // prune forgets a1 with its records.
        try env.expect(0, ["prune", "--vm", "a", "--keep-last", "1"])
        #expect(!env.repoFiles("verifications").contains { $0.hasPrefix(a1) })
        #expect(env.repoFiles("verifications").count == 4)
        // A manifest deleted behind cairn's back (an older cairn's prune) leaves records: check
        // counts them (not an error), gc removes them.
        try FileManager.default.removeItem(atPath: env.file("repo/snapshots/\(b1)"))
        let check = try env.expect(0, ["check"])
        #expect(check.stdout.contains("4 verification records, 2 of snapshots that no longer exist"), "\(check)")
        let gc = try env.expect(0, ["gc", "--json"])
        #expect(gc.stdout.contains("\"deletedVerifications\" : 2"), "\(gc)")
        #expect(env.repoFiles("verifications").allSatisfy { $0.hasPrefix(a2) } && env.repoFiles("verifications").count == 2)
        // check validates records: a damaged one is a problem (status 3) naming it.
        let victim = try #require(env.repoFiles("verifications").first)
        let path = env.file("repo/verifications/\(victim)")
        var bytes = try readFile(path)
        bytes[bytes.count - 10] ^= 0x55
        try FileManager.default.removeItem(atPath: path)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let bad = try env.expect(3, ["check"])
        #expect(bad.stdout.contains("corrupt verification \(victim)"), "\(bad)")
    }
}
