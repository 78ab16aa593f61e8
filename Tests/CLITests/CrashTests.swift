import CairnCore
import CairnTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Crash safety of the real binary: SIGKILL at random moments, SIGINT/SIGTERM handling.
@Suite("CLI crash safety", .serialized)
struct CrashTests {
    static let chunk = 64 * KiB

    /// Makes every chunk of `disk` new by stamping `generation` into each chunk (random
    /// data stays random, so every backup must store every chunk).
    static func stamp(_ disk: String, size: Int, generation: UInt64) throws {
        let f = try PosixFile(path: disk, flags: O_RDWR)
        for c in 0..<(size / chunk) {
            var words: [UInt64] = [0xCA1B_0000_0000_0000 | generation, UInt64(c)]
            try words.withUnsafeMutableBytes { try f.pwrite(UnsafeRawBufferPointer($0), at: UInt64(c * chunk + 100)) }
        }
        try f.fsync()
    }

    /// Polls `condition` every 2 ms for up to `timeout` seconds.
    static func waitFor(_ timeout: Double, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if condition() { return true }
            usleep(2_000)
        }
        return condition()
    }

    @Test("kill -9 at random moments of a backup never leaves a partial snapshot or a dangling reference",
          .timeLimit(.minutes(5)))
    func killDuringBackup() throws {
        let env = try CLIEnv("cli-kill", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let size = 64 * MiB
        let disk = env.file("busy.raw")
        try Disk.dense(disk, size: size, seed: 90)

        // Two complete backups first: the baseline snapshots, and (from the second, warm one)
        // the duration to sample kill moments from.
        try Self.stamp(disk, size: size, generation: 1_000_000)
        try env.expect(0, ["backup", "--vm", "k", "--quiet", disk])
        try Self.stamp(disk, size: size, generation: 0)
        let t0 = Date()
        try env.expect(0, ["backup", "--vm", "k", "--quiet", disk])
        var duration = Date().timeIntervalSince(t0)
        let firstDuration = duration
        #expect(try env.snapshots().count == 2)

        var rng = SeededRandom(seed: 91)
        let wantedKills = 20, maxAttempts = 40
        var killed = 0, completed = 0, killedAfterCommit = 0, attempts = 0
        var lastKilledGeneration: UInt64 = 0
        var delays: [Double] = []
        var checkSeconds = 0.0
        var known = Set(try env.snapshots().compactMap { $0.string("id") })
        while killed < wantedKills && attempts < maxAttempts {
            attempts += 1
            let generation = UInt64(attempts)
            try Self.stamp(disk, size: size, generation: generation)
            let startedAt = Date()
            let p = try env.cli.start(["backup", "--vm", "k", disk])
            let delay = Double(rng.next() % 10_000) / 10_000 * duration
            delays.append(delay)
            usleep(useconds_t(delay * 1_000_000))
            p.send(SIGKILL)
            let r = p.wait(timeout: 120)
            if r.exitedNormally {
                #expect(r.status == 0, "a backup that was not killed succeeds: \(r)")
                // Follow the real duration (the first backup runs cold, later ones list more
                // chunks), so the kill moments keep covering a whole backup.
                duration = 0.5 * duration + 0.5 * Date().timeIntervalSince(startedAt)
            } else {
                #expect(r.signaled && r.status == SIGKILL, "\(r)")
            }

            // At most the one snapshot of this backup appeared; if it did, the backup had
            // committed (its manifest is the last thing written) and the snapshot is whole.
            let ids = Set(try env.snapshots().compactMap { $0.string("id") })
            let added = ids.subtracting(known)
            #expect(known.isSubset(of: ids), "attempt \(attempts): snapshots disappeared")
            #expect(added.count <= 1, "attempt \(attempts): \(added.count) new snapshots")
            if r.exitedNormally {
                completed += 1
                #expect(added.count == 1, "attempt \(attempts): a completed backup shows its snapshot")
            } else if added.isEmpty {
                killed += 1
                lastKilledGeneration = generation
                #expect(!r.stdout.contains("saved"), "attempt \(attempts): the backup said it saved a snapshot: \(r)")
            } else {
                killedAfterCommit += 1
            }
            if let id = added.first {
                // The new snapshot holds exactly this generation of the disk.
                let out = env.file("check-\(attempts).raw")
                try env.expect(0, ["restore", id, "--to", out])
                #expect(try Disk.cmpEqual(disk, out), "attempt \(attempts): snapshot \(id) differs from the disk it was taken of")
                try? FileManager.default.removeItem(atPath: out)
            }
            known = ids

            let t = Date()
            let check = try env.expect(0, ["check", "--read-data"])
            checkSeconds += Date().timeIntervalSince(t)
            #expect(check.stdout.contains("no errors found"), "attempt \(attempts): \(check)")
            // The check took a lock: the dead backup's lock and temporary files are gone.
            #expect(env.repoFiles("locks").isEmpty, "attempt \(attempts): \(env.repoFiles("locks"))")
            #expect(env.repoFiles("tmp").isEmpty, "attempt \(attempts): \(env.repoFiles("tmp"))")
        }
        print("kill -9 loop: a backup takes \(String(format: "%.2f", firstDuration)) s first, \(String(format: "%.2f", duration)) s at the end; \(attempts) attempts: \(killed) killed before commit, \(killedAfterCommit) killed after commit, \(completed) completed; checks took \(String(format: "%.1f", checkSeconds)) s; delays \(delays.map { String(format: "%.2f", $0) })")
        #expect(killed >= wantedKills, "\(killed) backups killed part-way in \(attempts) attempts")
        let expected = known.count

        // A final backup of data whose chunks a killed backup left behind reuses them: they
        // must be whole. Its restore is byte-equal.
        try Self.stamp(disk, size: size, generation: lastKilledGeneration)
        let final = try env.expect(0, ["backup", "--vm", "k", "--json", disk])
        #expect(final.stdout.contains("\"type\":\"summary\""), "\(final)")
        let out = env.file("final.raw")
        try env.expect(0, ["restore", "latest", "--vm", "k", "--to", out])
        #expect(try Disk.cmpEqual(disk, out), "the final restore is byte-equal to the disk")
        try env.expect(0, ["check", "--read-data"])
        #expect(try env.snapshots().count == expected + 1)
    }

    @Test("SIGINT or SIGTERM during a backup: status 130, no snapshot, lock removed, check passes",
          arguments: [SIGINT, SIGTERM])
    func interruptBackup(signal: Int32) throws {
        let env = try CLIEnv("cli-int", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let size = 48 * MiB
        let disk = env.file("busy.raw")
        try Disk.dense(disk, size: size, seed: 92)

        let p = try env.cli.start(["backup", "--vm", "i", disk])
        // Interrupt once the job is storing chunks (its signal handlers are installed by then).
        let storing = Self.waitFor(60) { env.repoFiles("chunks").count >= 8 || !p.isRunning }
        #expect(storing)
        #expect(p.isRunning, "the backup is still running when interrupted")
        p.send(signal)
        let r = p.wait(timeout: 60)
        #expect(r.exitedNormally && r.status == 130, "\(r)")
        #expect(r.stderr.contains("interrupted"), "\(r)")
        #expect(env.repoFiles("locks").isEmpty, "the backup released its lock: \(env.repoFiles("locks"))")
        #expect(env.repoFiles("tmp").isEmpty, "no temporary files left: \(env.repoFiles("tmp"))")
        let stored = env.repoFiles("chunks").count
        #expect(stored > 0 && stored < size / Self.chunk, "the backup stopped part-way (\(stored) chunks)")
        #expect(try env.snapshots().isEmpty)
        try env.expect(0, ["check", "--read-data"])

        // The next backup reuses what the interrupted one stored.
        let again = try env.expect(0, ["backup", "--vm", "i", "--json", disk])
        let summary = again.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .first { $0.string("type") == "summary" }
        let d = (summary?["disks"] as? [[String: Any]])?.first
        #expect(d?.int("bytes_deduplicated") == stored * Self.chunk, "\(again.stdout)")
        #expect(d?.int("bytes_new") == size - stored * Self.chunk)
        let out = env.file("out.raw")
        try env.expect(0, ["restore", "latest", "--to", out])
        #expect(try Disk.cmpEqual(disk, out))
    }

    @Test("SIGINT during a restore: status 130, the new target is removed, lock released")
    func interruptRestore() throws {
        let env = try CLIEnv("cli-int-restore", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let size = 48 * MiB
        let disk = env.file("busy.raw")
        try Disk.dense(disk, size: size, seed: 93)
        try env.expect(0, ["backup", "--vm", "r", "--quiet", disk])

        let out = env.file("restore.raw")
        let p = try env.cli.start(["restore", "latest", "--to", out, "--workers", "1"])
        // Wait until data is being written (the job, and so its signal handler, is running).
        let writing = Self.waitFor(60) {
            var st = stat()
            return (stat(out, &st) == 0 && st.st_blocks * 512 >= 2 * Int(MiB)) || !p.isRunning
        }
        #expect(writing)
        #expect(p.isRunning, "the restore is still running when interrupted")
        p.send(SIGINT)
        let r = p.wait(timeout: 60)
        #expect(r.exitedNormally && r.status == 130, "\(r)")
        #expect(!FileManager.default.fileExists(atPath: out), "a new target of an interrupted restore is removed")
        #expect(env.repoFiles("locks").isEmpty)
        try env.expect(0, ["check"])
    }
}
