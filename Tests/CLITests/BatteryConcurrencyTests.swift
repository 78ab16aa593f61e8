import CairnCore
import CairnTestSupport
import Foundation
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Concurrency battery: four backups of four VMs in a loop, and beside them a loop of
/// `prune --keep-last 3` and `gc`, for `CAIRN_BATTERY_SECONDS` (default 60) seconds. Every
/// command must succeed (all wait for locks with --retry-lock); at the end the repository
/// checks clean with --read-data and every surviving snapshot restores byte-exact to the
/// disk version it was taken of. `stress/concurrency.sh` runs the long form.
@Suite("Battery: concurrency")
struct BatteryConcurrencyTests {
    @Test("4 concurrent backups + prune + gc in a loop: all succeed, check --read-data passes, every surviving snapshot restores byte-exact",
          .timeLimit(.minutes(120)))
    func backupsPruneGC() throws {
        let seconds = Double(ProcessInfo.processInfo.environment["CAIRN_BATTERY_SECONDS"].flatMap { Int($0) }.flatMap { $0 > 0 ? $0 : nil } ?? 60)
        let env = try CLIEnv("battery-conc", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let versions = env.file("versions")
        try FileManager.default.createDirectory(atPath: versions, withIntermediateDirectories: true)
        let vms: [(name: String, size: Int, seed: UInt64)] = [("vm1", 4 * MiB, 31), ("vm2", 3 * MiB + 24 * KiB, 32),
                                                              ("vm3", 4 * MiB, 33), ("vm4", 2 * MiB, 34)]
        let state = ConcurrencyState()
        let started = Date()
        let deadline = started.addingTimeInterval(seconds)
        let group = DispatchGroup()

        for vm in vms {
            group.enter()
            let t = Thread {
                defer { group.leave() }
                backupLoop(env: env, vm: vm.name, size: vm.size, seed: vm.seed, versions: versions, deadline: deadline, state: state)
            }
            t.stackSize = 1 << 20
            t.start()
        }
        group.enter()
        let maintenance = Thread {
            defer { group.leave() }
            maintenanceLoop(env: env, deadline: deadline, state: state)
        }
        maintenance.start()
        group.wait()
        let loopSeconds = Date().timeIntervalSince(started)

        let s = state.snapshot()
        #expect(s.failures.isEmpty, "\(s.failures.count) commands failed; first ones:\n\(s.failures.prefix(5).joined(separator: "\n---\n"))")

        // The repository is whole.
        let check = try env.expect(0, ["check", "--read-data"])
        #expect(check.stdout.contains("no errors found"), "\(check)")
        #expect(env.repoFiles("tmp").isEmpty, "leftovers in tmp/: \(env.repoFiles("tmp"))")
        #expect(env.repoFiles("locks").isEmpty, "leftovers in locks/: \(env.repoFiles("locks"))")

        // Every surviving snapshot was recorded by a backup and restores to its version file.
        let survivors = try env.snapshots()
        var verified = 0
        let out = env.file("restored.raw")
        for snap in survivors {
            guard let id = snap.string("id") else { Issue.record("a snapshot without id: \(snap)"); continue }
            guard let rec = s.recorded[id] else {
                Issue.record("snapshot \(id) (\(snap.string("vm") ?? "?")) was not reported by any backup")
                continue
            }
            #expect(snap.string("vm") == rec.vm, "snapshot \(id): VM \(snap.string("vm") ?? "?"), recorded for \(rec.vm)")
            try? FileManager.default.removeItem(atPath: out)
            try env.expect(0, ["restore", id, "--to", out, "--format", "raw"])
            #expect(try Disk.cmpEqual(rec.version, out), "snapshot \(id) of \(rec.vm) differs from \(rec.version)")
            verified += 1
        }
        // Each VM's newest backup survived (prune keeps the newest three).
        for vm in vms {
            let newest = s.recorded.filter { $0.value.vm == vm.name }.max { $0.value.generation < $1.value.generation }
            #expect(newest.map { id, _ in survivors.contains { $0.string("id") == id } } == true, "the newest backup of \(vm.name) survived")
        }

        let overlapping = s.gcIntervals.filter { g in s.backupIntervals.contains { b in b.start < g.end && g.start < b.end } }.count
        print("BATTERY concurrency: \(String(format: "%.0f", loopSeconds)) s of load, backups \(s.backups) "
              + "(\(vms.map { vm in "\(vm.name) \(s.recorded.values.filter { $0.vm == vm.name }.count)" }.joined(separator: ", "))), "
              + "prunes \(s.prunes) (forgot \(s.forgotten)), gcs \(s.gcIntervals.count) (\(overlapping) overlapping backups, "
              + "\(s.gcsWithLateSnapshots) saw snapshots finished during their mark, deleted \(s.deletedChunks) chunks), "
              + "failures \(s.failures.count), snapshots verified \(verified) of \(survivors.count); check --read-data clean")
        #expect(s.backups >= 4 * 2, "each backup loop ran a few times (\(s.backups) backups)")
        #expect(s.gcIntervals.count >= 2, "gc ran at least twice (\(s.gcIntervals.count))")
        #expect(overlapping >= 2, "at least two gc runs overlapped running backups (\(overlapping))")
        #expect(s.forgotten > 0, "prune forgot snapshots")
        #expect(verified == survivors.count && verified >= vms.count)
    }
}

fileprivate struct RecordedSnapshot: Sendable {
    var vm: String
    var generation: Int
    var version: String
}

fileprivate struct Interval: Sendable {
    var start: Date
    var end: Date
}

fileprivate struct ConcurrencyCounters: Sendable {
    var recorded: [String: RecordedSnapshot] = [:]
    var backups = 0
    var prunes = 0
    var forgotten = 0
    var gcsWithLateSnapshots = 0
    var deletedChunks = 0
    var backupIntervals: [Interval] = []
    var gcIntervals: [Interval] = []
    var failures: [String] = []
}

fileprivate final class ConcurrencyState: Sendable {
    let m = Mutex(ConcurrencyCounters())
    func update(_ body: (inout ConcurrencyCounters) -> Void) { m.withLock { body(&$0) } }
    func snapshot() -> ConcurrencyCounters { m.withLock { $0 } }
}

fileprivate func stampConcurrencyGeneration(_ path: String, size: Int, generation: Int) throws {
    let f = try PosixFile(path: path, flags: O_RDWR)
    let chunk = 64 * KiB
    for c in 0..<(size / chunk) {
        var words: [UInt64] = [0xC0C0_0000_0000_0000 | UInt64(generation), UInt64(c)]
        try words.withUnsafeMutableBytes { try f.pwrite(UnsafeRawBufferPointer($0), at: UInt64(c * chunk + 300)) }
    }
    try f.fsync()
}

/// The snapshot id in `backup --json` output (its `"type":"summary"` line).
fileprivate func summaryID(_ stdout: String) -> String? {
    for line in stdout.split(separator: "\n") {
        guard let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
              obj["type"] as? String == "summary" else { continue }
        return obj["id"] as? String
    }
    return nil
}

fileprivate func backupLoop(env: CLIEnv, vm: String, size: Int, seed: UInt64, versions: String, deadline: Date,
                            state: ConcurrencyState) {
    let disk = env.file("\(vm).raw")
    do {
        try Disk.dense(disk, size: size, seed: seed)
    } catch {
        state.update { $0.failures.append("\(vm): cannot write the disk: \(error)") }
        return
    }
    var generation = 0
    var failures = 0
    while Date() < deadline && failures < 3 {
        generation += 1
        let version = (versions as NSString).appendingPathComponent("\(vm)-\(generation).raw")
        do {
            try stampConcurrencyGeneration(disk, size: size, generation: generation)
            try FileManager.default.copyItem(atPath: disk, toPath: version)
            let t0 = Date()
            let r = try env.cli.run(["backup", "--json", "--retry-lock", "2m", "--vm", vm, disk], timeout: 600)
            let t1 = Date()
            guard r.exitedNormally && r.status == 0, let id = summaryID(r.stdout) else {
                failures += 1
                state.update { $0.failures.append("\(vm) generation \(generation): \(r)") }
                try? FileManager.default.removeItem(atPath: version)
                continue
            }
            state.update {
                $0.backups += 1
                $0.recorded[id] = RecordedSnapshot(vm: vm, generation: generation, version: version)
                $0.backupIntervals.append(Interval(start: t0, end: t1))
            }
        } catch {
            failures += 1
            state.update { $0.failures.append("\(vm) generation \(generation): \(error)") }
        }
    }
}

fileprivate func maintenanceLoop(env: CLIEnv, deadline: Date, state: ConcurrencyState) {
    var rng = SeededRandom(seed: 0xC0_4C)
    var failures = 0
    // Let the backups get going first.
    usleep(500_000)
    while Date() < deadline && failures < 3 {
        do {
            let prune = try env.cli.run(["prune", "--keep-last", "3", "--retry-lock", "2m", "--json"], timeout: 600)
            if prune.exitedNormally && prune.status == 0 {
                let obj = try? JSONSerialization.jsonObject(with: prune.stdoutData) as? [String: Any]
                let decisions = (obj?["prune"] as? [String: Any])?["decisions"] as? [[String: Any]] ?? []
                let forgot = decisions.filter { ($0["keep"] as? Bool) == false }.count
                state.update { $0.prunes += 1; $0.forgotten += forgot }
            } else {
                failures += 1
                state.update { $0.failures.append("prune: \(prune)") }
            }

            let g0 = Date()
            let gc = try env.cli.run(["gc", "--retry-lock", "2m", "--json"], timeout: 600)
            let g1 = Date()
            if gc.exitedNormally && gc.status == 0 {
                let obj = try? JSONSerialization.jsonObject(with: gc.stdoutData) as? [String: Any]
                let late = (obj?["snapshotsAddedDuringMark"] as? NSNumber)?.intValue ?? 0
                let deleted = (obj?["deletedChunks"] as? NSNumber)?.intValue ?? 0
                state.update {
                    $0.gcIntervals.append(Interval(start: g0, end: g1))
                    if late > 0 { $0.gcsWithLateSnapshots += 1 }
                    $0.deletedChunks += deleted
                }
            } else {
                failures += 1
                state.update { $0.failures.append("gc: \(gc)") }
            }

            // Version files of snapshots that are gone (pruned: they never come back) are not
            // needed any more; drop them so long runs do not fill the disk. Only ids recorded
            // before the listing started count.
            let recordedBefore = state.snapshot().recorded
            let list = try env.cli.run(["snapshots", "--json"])
            if list.exitedNormally && list.status == 0,
               let arr = try? JSONSerialization.jsonObject(with: list.stdoutData) as? [[String: Any]] {
                let present = Set(arr.compactMap { $0["id"] as? String })
                for (id, rec) in recordedBefore where !present.contains(id) {
                    try? FileManager.default.removeItem(atPath: rec.version)
                }
            } else {
                failures += 1
                state.update { $0.failures.append("snapshots --json: \(list)") }
            }
        } catch {
            failures += 1
            state.update { $0.failures.append("maintenance: \(error)") }
        }
        // Pause between rounds (0.3-1.3 s), so backups also get windows without gc.
        usleep(useconds_t(300_000 + Int(rng.next() % 1_000_000)))
    }
}
