import CairnCore
import CairnTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("CLI concurrency")
struct ConcurrencyTests {
    static let lockRaceBug: Comment = """
        BUG (Repository.lock / LocalDirectoryStore): jobs starting together on one repository fail. \
        (a) the lock file is written through tmp/anon.* before setTemporaryOwner, and another job's \
        removeStaleTemporaries deletes it: "locks/<id>: rename failed: No such file or directory"; \
        (b) readLocks turns a lock released between list and get into nil, which lock() treats as \
        exclusive: "repository is locked: an unreadable lock" (exit 11) between two shared jobs.
        """

    /// The two failure modes of the lock race described in `lockRaceBug`.
    static func isKnownLockRace(_ r: CLIResult) -> Bool {
        guard r.exitedNormally else { return false }
        return (r.status == 1 && r.stderr.contains("/locks/") && r.stderr.contains("rename failed: No such file or directory"))
            || (r.status == 11 && r.stderr.contains("repository is locked: an unreadable lock"))
    }

    @Test("many shared jobs starting at the same moment all get their lock")
    func lockStorm() throws {
        let env = try CLIEnv("cli-storm", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let disk = env.file("d.raw")
        try Disk.dense(disk, size: 1 * MiB, seed: 98)
        try env.expect(0, ["backup", "--vm", "s", disk])
        var raced: [CLIResult] = []
        var total = 0
        for _ in 0..<6 {
            let running = try (0..<6).map { _ in try env.cli.start(["check"]) }
            for p in running {
                let r = p.wait(timeout: 60)
                total += 1
                if r.exitedNormally && r.status == 0 { continue }
                if Self.isKnownLockRace(r) { raced.append(r) } else { Issue.record("a shared job failed: \(r)") }
            }
        }
        print("lock storm: \(raced.count) of \(total) shared jobs lost the lock race")
        withKnownIssue(Self.lockRaceBug, isIntermittent: true) {
            #expect(raced.isEmpty, "\(raced.count) of \(total) jobs failed, e.g. \(raced.first.map { $0.stderr } ?? "")")
        }
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
            if r.exitedNormally && r.status == 0 { continue }
            if Self.isKnownLockRace(r) {
                // The lock-taking race below hit this job; run it again on its own so the rest
                // of the test still checks what two racing backups stored.
                withKnownIssue(Self.lockRaceBug, isIntermittent: true) { Issue.record("\(r)") }
                try env.expect(0, args)
            } else {
                Issue.record("concurrent job failed: \(r)")
            }
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
