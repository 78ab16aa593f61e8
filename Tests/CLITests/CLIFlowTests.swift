import CairnCore
import CairnTestSupport
import Foundation
import Testing

@Suite("CLI flow")
struct CLIFlowTests {
    @Test("the binary is found next to the test executable or through CAIRN_BIN")
    func binaryIsFound() throws {
        let path = try CairnBinary.locate()
        print("cairn binary under test: \(path)")
        #expect(FileManager.default.isExecutableFile(atPath: path))
        let dir = try TempDir("cli-bin")
        let r = try CairnCLI(repository: nil, password: nil, scratch: dir.path).run(["--version"])
        #expect(r.exitedNormally && r.status == 0, "\(r)")
        #expect(r.stdout.hasPrefix("cairn "), "\(r)")
    }

    @Test("init, backup (NAME=PATH and PATH), snapshots --json, restore by latest and by prefix, check, stats")
    func fullFlow() throws {
        let env = try CLIEnv("cli-flow")
        let sizeA = 3 * MiB + 3 * 4096 + 512
        let a = env.file("alpha.raw")
        try Disk.mixed(a, size: sizeA, seed: 70)
        let bRaw = env.file("bravo-src.raw"), b = env.file("bravo.qcow2")
        let sizeB = 2 * MiB
        try Disk.mixed(bRaw, size: sizeB, seed: 71)
        try Tool.run("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", bRaw, b])

        // init
        let initOut = try env.expect(0, ["init", "--chunk-size", "64K"])
        #expect(initOut.stdout.contains("created repository"), "\(initOut)")
        #expect(FileManager.default.fileExists(atPath: env.repo + "/config"))
        let again = try env.expect(64, ["init"])
        #expect(again.stderr.contains("already exists"), "\(again)")

        // backup: NAME=PATH, then a bare PATH (named after the file), then another VM.
        let b1 = try env.expect(0, ["backup", "--vm", "web", "sys=\(a)"])
        #expect(b1.stdout.contains("disk sys:") && b1.stdout.contains("saved"), "\(b1)")
        let b2 = try env.expect(0, ["backup", "--vm", "web", "--json", b])
        let summaries = b2.stdout.split(separator: "\n").compactMap { line -> [String: Any]? in
            guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], o.string("type") == "summary" else { return nil }
            return o
        }
        #expect(summaries.count == 1, "one summary line: \(b2.stdout)")
        let s2disks = summaries.first?["disks"] as? [[String: Any]]
        #expect(s2disks?.first?.string("name") == "bravo.qcow2")
        #expect(s2disks?.first?.string("format") == "qcow2")
        #expect(s2disks?.first?.int("size") == sizeB)
        let b3 = try env.expect(0, ["backup", "--vm", "db", "--tag", "nightly", "--json", "data=\(a)"])
        let s3 = b3.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .first { $0.string("type") == "summary" }
        let s3disk = (s3?["disks"] as? [[String: Any]])?.first
        #expect(s3disk?.int("bytes_new") == 0, "the same disk again stores nothing: \(b3.stdout)")
        #expect((s3disk?.int("bytes_deduplicated") ?? 0) > 0)

        // snapshots --json
        let snaps = try env.snapshots()
        #expect(snaps.count == 3)
        let iso = ISO8601DateFormatter()
        iso.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        for s in snaps {
            let id = s.string("id") ?? ""
            #expect(id.count == 64 && id.allSatisfy(\.isHexDigit), "id \(id)")
            #expect(s.string("vm") != nil)
            #expect(s.string("time").flatMap { iso.date(from: $0) } != nil, "time \(String(describing: s["time"]))")
            let disks = s["disks"] as? [[String: Any]] ?? []
            #expect(disks.count == 1)
            #expect(disks.allSatisfy { $0.string("name") != nil && $0.int("size") != nil })
        }
        #expect(snaps.map { $0.string("vm") ?? "" } == ["web", "web", "db"])
        #expect(snaps.map { ($0["disks"] as? [[String: Any]])?.first?.string("name") ?? "" } == ["sys", "bravo.qcow2", "data"])
        #expect(snaps.map { ($0["disks"] as? [[String: Any]])?.first?.int("size") ?? -1 } == [sizeA, sizeB, sizeA])
        #expect((snaps[2]["tags"] as? [String]) == ["nightly"])
        let ids = snaps.map { $0.string("id") ?? "" }
        let web = try JSONSerialization.jsonObject(with: env.expect(0, ["snapshots", "--vm", "web", "--json"]).stdoutData) as? [[String: Any]]
        #expect(web?.map { $0.string("id") ?? "" } == Array(ids.prefix(2)))
        let table = try env.expect(0, ["snapshots"])
        #expect(ids.allSatisfy { table.stdout.contains(String($0.prefix(8))) }, "\(table)")

        // restore latest --vm web = bravo; qemu-img is the referee.
        let out1 = env.file("out1.raw")
        try env.expect(0, ["restore", "latest", "--vm", "web", "--to", out1])
        #expect(try Tool.qemuImgCompare(b, out1, formatA: "qcow2", formatB: "raw"))
        #expect(try Disk.cmpEqual(bRaw, out1))

        // restore by a unique id prefix.
        var prefixLength = 4
        while ids.filter({ $0.hasPrefix(ids[0].prefix(prefixLength)) }).count > 1 { prefixLength += 1 }
        let out2 = env.file("out2.raw")
        try env.expect(0, ["restore", String(ids[0].prefix(prefixLength)), "--to", out2])
        #expect(try Disk.cmpEqual(a, out2))
        let upper = env.file("out2u.raw")
        try env.expect(0, ["restore", String(ids[0].prefix(prefixLength + 2)).uppercased(), "--to", upper])
        #expect(try Disk.cmpEqual(a, upper))

        // restore to qcow2.
        let out3 = env.file("out3.qcow2")
        try env.expect(0, ["restore", ids[2], "--format", "qcow2", "--to", out3])
        #expect(try Tool.run("qemu-img", ["check", "-q", "-f", "qcow2", out3], check: false).status == 0)
        #expect(try Tool.qemuImgCompare(a, out3, formatA: "raw", formatB: "qcow2"))

        // An existing target needs --overwrite; then it is rewritten in place.
        let existing = env.file("existing.raw")
        try Disk.dense(existing, size: sizeA + 1 * MiB, seed: 72)
        let refused = try env.expect(64, ["restore", ids[0], "--to", existing])
        #expect(refused.stderr.contains("exists"), "\(refused)")
        try env.expect(0, ["restore", ids[0], "--to", existing, "--overwrite"])
        #expect(try Disk.cmpEqual(a, existing))

        // Wrong references.
        try env.expect(1, ["restore", ids[0], "--disk", "nope", "--to", env.file("x1.raw")])
        try env.expect(1, ["restore", "0000000000000000", "--to", env.file("x2.raw")])
        try env.expect(1, ["restore", "latest", "--vm", "no-such-vm", "--to", env.file("x3.raw")])
        try env.expect(64, ["restore", "not-an-id!", "--to", env.file("x4.raw")])
        for f in ["x1.raw", "x2.raw", "x3.raw", "x4.raw"] {
            #expect(!FileManager.default.fileExists(atPath: env.file(f)), "a failed restore leaves no \(f)")
        }

        // check
        let check = try env.expect(0, ["check", "--read-data"])
        #expect(check.stdout.contains("3 snapshots") && check.stdout.contains("no errors found"), "\(check)")
        let checkJSON = try env.expect(0, ["check", "--read-data", "--json"])
        let report = try #require(try JSONSerialization.jsonObject(with: checkJSON.stdoutData) as? [String: Any])
        #expect((report["problems"] as? [Any])?.isEmpty == true)
        #expect(report.int("snapshots") == 3)
        #expect((report.int("chunksRead") ?? 0) > 0)
        #expect(report.int("chunksRead") == report.int("referencedChunks"))

        // stats --json
        let statsOut = try env.expect(0, ["stats", "--json"])
        let stats = try #require(try JSONSerialization.jsonObject(with: statsOut.stdoutData) as? [String: Any], "\(statsOut)")
        #expect(stats.int("snapshots") == 3)
        #expect(stats.int("logical_bytes") == 2 * sizeA + sizeB)
        #expect((stats.int("stored_bytes") ?? 0) > 0)
        #expect((stats.int("stored_bytes") ?? Int.max) < 2 * sizeA + sizeB, "dedup and compression make the repository smaller")
        #expect(((stats["deduplication_ratio"] as? NSNumber)?.doubleValue ?? 0) > 1.3, "\(stats)")
        #expect(((stats["compression_ratio"] as? NSNumber)?.doubleValue ?? 0) >= 1.0, "\(stats)")
        #expect(stats["total_ratio"] != nil && stats["unique_data_bytes"] != nil && stats["referenced_data_bytes"] != nil)
        #expect((stats.int("referenced_data_bytes") ?? 0) > (stats.int("unique_data_bytes") ?? Int.max))

        // Nothing left behind.
        #expect(env.repoFiles("locks").isEmpty)
        #expect(env.repoFiles("tmp").isEmpty)
    }

    @Test("--repo and --password-file instead of the environment; several disks need --disk")
    func optionsInsteadOfEnvironment() throws {
        var env = try CLIEnv("cli-opts", password: nil)
        env.cli.repository = nil
        let pwFile = env.file("pw")
        #expect(FileManager.default.createFile(atPath: pwFile, contents: Data("file password\n".utf8)))
        let a = env.file("a.raw"), b = env.file("b.raw")
        try Disk.mixed(a, size: 1 * MiB, seed: 73)
        try Disk.mixed(b, size: 1 * MiB + 512, seed: 74)
        try env.expect(0, ["init", "--repo", env.repo, "--password-file", pwFile, "--chunk-size", "256K"])
        try env.expect(0, ["backup", "-r", env.repo, "--password-file", pwFile, "--vm", "two", "a=\(a)", "b=\(b)"])
        // The password file's trailing newline is not part of the password.
        try env.expect(0, ["snapshots", "--repo", env.repo], environment: ["CAIRN_PASSWORD": "file password"])
        let many = try env.expect(64, ["restore", "latest", "--repo", env.repo, "--password-file", pwFile, "--to", env.file("o.raw")])
        #expect(many.stderr.contains("--disk"), "\(many)")
        try env.expect(0, ["restore", "latest", "--repo", env.repo, "--password-file", pwFile, "--disk", "b", "--to", env.file("ob.raw")])
        #expect(try Disk.cmpEqual(b, env.file("ob.raw")))
        try env.expect(64, ["backup", "--repo", env.repo, "--password-file", pwFile, "--vm", "dup", "x=\(a)", "x=\(b)"])
    }
}
