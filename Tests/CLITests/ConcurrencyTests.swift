import CairnCore
import CairnTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("CLI concurrency")
struct ConcurrencyTests {
    @Test("many shared jobs starting at the same moment all get their lock")
    func lockStorm() throws {
        let env = try CLIEnv("cli-storm", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let disk = env.file("d.raw")
        try Disk.dense(disk, size: 1 * MiB, seed: 98)
        try env.expect(0, ["backup", "--vm", "s", disk])
        var failed: [CLIResult] = []
        for _ in 0..<6 {
            let running = try (0..<6).map { _ in try env.cli.start(["check"]) }
            for p in running {
                let r = p.wait(timeout: 60)
                if !(r.exitedNormally && r.status == 0) { failed.append(r) }
            }
        }
        #expect(failed.isEmpty, "\(failed.count) of 36 shared jobs failed to get their lock, e.g. \(failed.first.map { "\($0)" } ?? "")")
        // Whatever happened, nothing is left behind and the repository is intact.
        #expect(env.repoFiles("locks").isEmpty, "\(env.repoFiles("locks"))")
        #expect(env.repoFiles("tmp").isEmpty, "\(env.repoFiles("tmp"))")
        try env.expect(0, ["check", "--read-data"])
    }

    @Test("two backups and a check at the same time share the repository (shared locks)")
    func concurrentBackups() throws {
        let env = try CLIEnv("cli-conc", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        // Two clones of one 16 MiB template, each with its own change: most chunks are common,
        // so both processes race to store the same chunks.
        let size = 16 * MiB
        let d1 = env.file("one.raw"), d2 = env.file("two.raw")
        try Disk.dense(d1, size: size, seed: 95)
        try Disk.dense(d2, size: size, seed: 95)
        var rng = SeededRandom(seed: 96)
        try writeBytes(rng.bytes(1 * MiB), to: d1, at: UInt64(3 * MiB))
        try writeBytes(rng.bytes(1 * MiB), to: d2, at: UInt64(9 * MiB + 12345))
        // Something to check while the backups run.
        try env.expect(0, ["backup", "--vm", "seed", d1])

        let jobs = [["backup", "--vm", "one", d1], ["backup", "--vm", "two", d2], ["check", "--read-data"]]
        let running = try jobs.map { try env.cli.start($0) }
        for (args, p) in zip(jobs, running) {
            let r = p.wait(timeout: 120)
            #expect(r.exitedNormally && r.status == 0, "concurrent job \(args) failed: \(r)")
        }

        let snaps = try env.snapshots()
        #expect(Set(snaps.compactMap { $0.string("vm") }) == ["seed", "one", "two"])
        try env.expect(0, ["check", "--read-data"])
        #expect(env.repoFiles("locks").isEmpty)
        #expect(env.repoFiles("tmp").isEmpty)
        // Each distinct chunk is stored once: disk one's 256, then of disk two its 17 changed
        // chunks and the 16 template chunks that disk one overwrote.
        let chunks = env.repoFiles("chunks").count
        #expect(chunks == 256 + 17 + 16, "distinct chunks stored: \(chunks)")
        for (vm, disk) in [("one", d1), ("two", d2)] {
            let out = env.file("\(vm).out")
            try env.expect(0, ["restore", "latest", "--vm", vm, "--to", out])
            #expect(try Disk.cmpEqual(disk, out), "restore of \(vm)")
        }
    }
}
