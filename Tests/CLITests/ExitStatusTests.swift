import CairnCore
import CairnTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Exit statuses documented in `cairn --help`: 0 ok, 1 failure, 3 corrupt data found,
/// 10 no repository, 11 locked, 12 wrong password, 64 usage, 130 interrupted.
@Suite("CLI exit statuses")
struct ExitStatusTests {
    /// An encrypted repository with one snapshot of a small disk.
    static func populated(_ prefix: String) throws -> (CLIEnv, disk: String) {
        let env = try CLIEnv(prefix)
        let disk = env.file("disk.raw")
        try Disk.dense(disk, size: 1 * MiB + 4096, seed: 80)
        try env.expect(0, ["init", "--chunk-size", "64K"])
        try env.expect(0, ["backup", "--vm", "vm1", disk])
        return (env, disk)
    }

    @Test("wrong or missing password: status 12, nothing on stdout, nothing written")
    func wrongPassword() throws {
        let (env, disk) = try Self.populated("cli-pw")
        let out = env.file("o.raw")
        let commands: [[String]] = [
            ["snapshots"], ["snapshots", "--json"], ["check"], ["check", "--read-data"], ["stats", "--json"],
            ["backup", "--vm", "vm1", disk], ["restore", "latest", "--to", out],
        ]
        for args in commands {
            let r = try env.expect(12, args, environment: ["CAIRN_PASSWORD": "wrong password"])
            #expect(r.stdoutData.isEmpty, "nothing on stdout: \(r)")
            #expect(r.stderr.contains("wrong password"), "\(r)")
            // No password at all (and no terminal to ask on) is refused the same way.
            let none = try env.expect(12, args, environment: ["CAIRN_PASSWORD": nil])
            #expect(none.stdoutData.isEmpty, "\(none)")
        }
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(try env.snapshots().count == 1, "no snapshot was added")
        #expect(env.repoFiles("locks").isEmpty)
        // A password file with the wrong password too.
        let pw = env.file("pw")
        #expect(FileManager.default.createFile(atPath: pw, contents: Data("nope".utf8)))
        try env.expect(12, ["snapshots", "--password-file", pw])
    }

    @Test("missing repository: status 10")
    func missingRepository() throws {
        var env = try CLIEnv("cli-norepo")
        let disk = env.file("disk.raw")
        try Disk.dense(disk, size: 256 * KiB, seed: 81)
        env.cli.repository = env.file("does-not-exist")
        for args in [["snapshots"], ["check"], ["stats"], ["backup", "--vm", "v", disk], ["restore", "latest", "--to", env.file("o.raw")]] {
            let r = try env.expect(10, args)
            #expect(r.stdoutData.isEmpty, "\(r)")
            #expect(r.stderr.contains("no Cairn repository"), "\(r)")
        }
        // An existing directory that is not a repository is no repository either.
        try FileManager.default.createDirectory(atPath: env.file("empty"), withIntermediateDirectories: true)
        try env.expect(10, ["snapshots", "--repo", env.file("empty")])
        #expect(!FileManager.default.fileExists(atPath: env.file("does-not-exist")), "nothing was created")
    }

    @Test("bad usage: status 64")
    func badUsage() throws {
        let (env, disk) = try Self.populated("cli-usage")
        let cases: [[String]] = [
            ["frobnicate"],
            ["backup"],                                          // no --vm, no disk
            ["backup", "--vm", "v"],                             // no disk
            ["backup", disk],                                    // no --vm
            ["backup", "--vm", "", disk],
            ["backup", "--vm", "v", "--format", "vdi", disk],
            ["backup", "--vm", "v", "--workers", "many", disk],
            ["restore", "latest"],                               // no --to
            ["restore", "latest", "--to", env.file("o.raw"), "--format", "vdi"],
            ["snapshots", "--no-such-flag"],
        ]
        for args in cases {
            let r = try env.expect(64, args)
            #expect(r.stdoutData.isEmpty || args == ["frobnicate"], "\(r)")
            #expect(!r.stderr.isEmpty, "an explanation on stderr: \(r)")
        }
        // A known format forced onto the wrong image is a malformed image (1), named clearly.
        let forced = try env.expect(1, ["backup", "--vm", "v", "--format", "vmdk", disk])
        #expect(forced.stderr.contains("not a VMDK image"), "\(forced)")
        // No repository given at all.
        var bare = env
        bare.cli.repository = nil
        let noRepo = try bare.expect(64, ["snapshots"])
        #expect(noRepo.stderr.contains("CAIRN_REPO"), "\(noRepo)")
        // init arguments.
        let fresh = env.file("fresh")
        for args in [["init", "--repo", fresh, "--chunk-size", "3K"], ["init", "--repo", fresh, "--chunk-size", "16M"],
                     ["init", "--repo", fresh, "--chunk-size", "96K"], ["init", "--repo", fresh, "--encryption", "rot13"],
                     ["init", "--repo", fresh, "--compression-level", "0"]] {
            try env.expect(64, args)
        }
        #expect(!FileManager.default.fileExists(atPath: fresh + "/config"))
        #expect(try env.snapshots().count == 1)
    }

    @Test("corrupt chunk: check --read-data and restore exit 3, plain check still 0")
    func corruptChunk() throws {
        let (env, _) = try Self.populated("cli-corrupt")
        let chunkDir = env.repo + "/chunks"
        let chunks = env.repoFiles("chunks").sorted()
        #expect(chunks.count == 17)
        let victim = chunkDir + "/" + chunks[chunks.count / 2]
        let victimID = (victim as NSString).lastPathComponent
        #expect(chmod(victim, 0o644) == 0)
        var bytes = try readFile(victim)
        bytes[bytes.count / 2] ^= 0x40
        #expect(FileManager.default.createFile(atPath: victim, contents: Data(bytes)))

        try env.expect(0, ["check"])
        let r = try env.expect(3, ["check", "--read-data"])
        #expect(r.stdout.contains(victimID), "check names the chunk: \(r)")
        #expect(r.stdout.contains("used by snapshot"), "\(r)")
        let restore = try env.expect(3, ["restore", "latest", "--to", env.file("o.raw")])
        #expect(restore.stderr.contains(victimID), "\(restore)")
        #expect(!FileManager.default.fileExists(atPath: env.file("o.raw")), "a failed new target is removed")
        let json = try env.expect(3, ["check", "--read-data", "--json"])
        let report = try JSONSerialization.jsonObject(with: json.stdoutData) as? [String: Any]
        let problems = report?["problems"] as? [[String: Any]] ?? []
        #expect(problems.count == 1 && problems.first?.string("object") == victimID, "\(json)")
    }

    @Test("a repository locked exclusively by a live process: status 11")
    func locked() throws {
        let (env, disk) = try Self.populated("cli-lock")
        var host = [UInt8](repeating: 0, count: 256)
        host.withUnsafeMutableBufferPointer { p in
            p.baseAddress!.withMemoryRebound(to: CChar.self, capacity: 256) { _ = gethostname($0, 255) }
        }
        let hostName = String(decoding: host.prefix { $0 != 0 }, as: UTF8.self)
        let now = ISO8601DateFormatter().string(from: Date())
        let record: [String: Any] = ["version": 1, "kind": "exclusive", "host": hostName, "pid": Int(getpid()),
                                     "time": now, "heartbeat": now, "job": "test gc"]
        let lockPath = env.repo + "/locks/00112233deadbeef"
        #expect(FileManager.default.createFile(atPath: lockPath, contents: try JSONSerialization.data(withJSONObject: record)))
        for args in [["backup", "--vm", "vm1", disk], ["check"], ["restore", "latest", "--to", env.file("o.raw")]] {
            let r = try env.expect(11, args)
            #expect(r.stderr.contains("locked") && r.stderr.contains("test gc"), "\(r)")
        }
        #expect(env.repoFiles("locks") == ["00112233deadbeef"], "the refused jobs removed their own lock files")
        #expect(try env.snapshots().count == 1)

        // A lock of a dead process is stale and removed by the next job.
        var dead = record
        dead["pid"] = Int(Int32.max - 7)
        #expect(FileManager.default.createFile(atPath: lockPath, contents: try JSONSerialization.data(withJSONObject: dead)))
        try env.expect(0, ["backup", "--vm", "vm1", disk])
        #expect(env.repoFiles("locks").isEmpty)
    }

    @Test("unreadable or malformed disks: status 1 and a message naming the file")
    func badDisks() throws {
        let (env, _) = try Self.populated("cli-baddisk")
        let missing = env.file("missing.raw")
        let r1 = try env.expect(1, ["backup", "--vm", "v", missing])
        #expect(r1.stderr.contains(missing), "\(r1)")
        let q = env.file("t.qcow2")
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", q, "4M"])
        #expect(truncate(q, 50) == 0)
        let r2 = try env.expect(1, ["backup", "--vm", "v", q])
        #expect(r2.stderr.contains("cairn: error:") && r2.stderr.contains(q), "\(r2)")
        // A qcow2 with a backing file needs --backing.
        let base = env.file("base.qcow2"), top = env.file("top.qcow2")
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", base, "1M"])
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "1M"])
        let r3 = try env.expect(64, ["backup", "--vm", "v", top])
        #expect(r3.stderr.contains("--backing"), "\(r3)")
        try env.expect(0, ["backup", "--vm", "v", top, "--backing", base])
        #expect(try env.snapshots().count == 2)
    }

    @Test("a valid qcow2 with a huge virtual size (16 PiB) fails cleanly instead of crashing")
    func hugeVirtualSize() throws {
        var env = try CLIEnv("cli-huge", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let huge = env.file("huge.qcow2")
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", huge, "16P"])
        try Tool.run("qemu-io", ["-f", "qcow2", "-c", "write -P 7 0 1M", huge])
        // The image is valid (qemu-img check agrees) and only a few MiB on disk.
        #expect(try Tool.run("qemu-img", ["check", "-q", huge], check: false).status == 0)
        env.cli.memoryLimitKiB = 4 << 20  // 4 GiB of address space: a runaway allocation fails fast
        let r = try env.cli.run(["backup", "--vm", "huge", huge], timeout: 120)
        #expect(r.exitedNormally, "cairn must not die from a signal: \(r)")
        #expect(r.status == 1 && r.stderr.contains("index entries") && r.stderr.contains("--chunk-size"), "a clear error naming the limit and the way out: \(r)")
        #expect(!r.timedOut)
        let after = try env.cli.run(["check", "--read-data"])
        #expect(after.status == 0, "a crashed backup leaves a consistent repository: \(after)")
    }
}
