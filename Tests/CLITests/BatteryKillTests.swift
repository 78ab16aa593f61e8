import CairnCore
import CairnTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// kill -9 battery: hundreds of SIGKILLs of the real binary at random moments of backups,
/// prunes and garbage collections of one repository. After every kill the same job is run
/// again and must succeed; the repository is checked with `check --read-data` every 25 kills
/// and at the end, and every surviving snapshot must restore byte-identical to the disk
/// generation it was taken of.
///
/// The kill count is `CAIRN_BATTERY_KILLS` (default 200) for the unencrypted repository and
/// `CAIRN_BATTERY_ENCRYPTED_KILLS` (default 20) for the encrypted one; `stress/kill-loop.sh`
/// runs the long form.
@Suite("Battery: kill -9", .serialized)
struct BatteryKillTests {
    @Test("kill -9 during backup, prune and gc (unencrypted, 64 KiB chunks): every rerun succeeds, check --read-data passes, restores are byte-identical",
          .timeLimit(.minutes(120)))
    func killBatteryPlain() throws {
        let kills = killBatteryEnvInt("CAIRN_BATTERY_KILLS") ?? 200
        try KillBattery(label: "plain", encrypted: false, wantedKills: kills, seed: 0xB417_0001,
                        vms: [("alpha", 4 * MiB, 11), ("bravo", 6 * MiB + 40 * KiB, 12), ("charlie", 8 * MiB, 13)]).run()
    }

    @Test("kill -9 during backup, prune and gc (encrypted, 64 KiB chunks)", .timeLimit(.minutes(60)))
    func killBatteryEncrypted() throws {
        let kills = killBatteryEnvInt("CAIRN_BATTERY_ENCRYPTED_KILLS") ?? 20
        try KillBattery(label: "encrypted", encrypted: true, wantedKills: kills, seed: 0xB417_0002,
                        vms: [("delta", 3 * MiB, 21), ("echo", 4 * MiB + 64 * KiB, 22)]).run()
    }
}

fileprivate func killBatteryEnvInt(_ name: String) -> Int? {
    guard let s = ProcessInfo.processInfo.environment[name], let n = Int(s), n > 0 else { return nil }
    return n
}

fileprivate let stampChunk = 64 * KiB

/// Writes `generation` into every full 64 KiB chunk of the disk (random data stays random, so
/// every generation's backup stores every full chunk anew).
fileprivate func stampGeneration(_ path: String, size: Int, generation: UInt64) throws {
    let f = try PosixFile(path: path, flags: O_RDWR)
    for c in 0..<(size / stampChunk) {
        var words: [UInt64] = [0xBA77_0000_0000_0000 | generation, UInt64(c)]
        try words.withUnsafeMutableBytes { try f.pwrite(UnsafeRawBufferPointer($0), at: UInt64(c * stampChunk + 200)) }
    }
    try f.fsync()
}

fileprivate enum KillJob: String, CaseIterable {
    case backup, prune, gc
}

fileprivate struct KillVM {
    let name: String
    let size: Int
    let seed: UInt64
    let path: String
    var generation: UInt64 = 0
    var diskName: String { (path as NSString).lastPathComponent }
}

/// A snapshot as `snapshots --json` lists it.
fileprivate struct ListedSnapshot {
    let id: String
    let vm: String
    let time: String
}

fileprivate final class KillBattery {
    let label: String
    let encrypted: Bool
    let wantedKills: Int
    let maxAttempts: Int
    var rng: SeededRandom
    let env: CLIEnv
    var vms: [KillVM] = []
    /// Snapshot id -> (VM index, disk generation) of every snapshot ever seen.
    var generationOf: [String: (vm: Int, generation: UInt64)] = [:]
    /// The snapshots the repository holds, as last listed.
    var known: [String: ListedSnapshot] = [:]
    var nextGeneration: UInt64 = 1
    /// Moving average of each job's duration (start to exit), seconds.
    var typical: [KillJob: Double] = [:]
    var landed: [KillJob: Int] = [:]
    var finishedBeforeKill: [KillJob: Int] = [:]
    var backupsKilledAfterCommit = 0
    var checks = 0
    var calibrations = 0
    var attemptsByKind: [KillJob: Int] = [:]
    var rerunFailures = 0
    var killsLeavingTemporaries = 0
    var temporariesLeft = 0
    /// Temporary lock files (locks/.tmp-*) left behind -> where they were first seen.
    var leakedLockTemporaries: [String: String] = [:]

    init(label: String, encrypted: Bool, wantedKills: Int, seed: UInt64, vms spec: [(String, Int, UInt64)]) throws {
        self.label = label
        self.encrypted = encrypted
        self.wantedKills = wantedKills
        self.maxAttempts = 3 * wantedKills + 50
        rng = SeededRandom(seed: seed)
        env = try CLIEnv("battery-kill-\(label)", password: encrypted ? "battery pass" : nil)
        for (name, size, s) in spec {
            vms.append(KillVM(name: name, size: size, seed: s, path: env.file("\(name).raw")))
        }
    }

    var totalLanded: Int { landed.values.reduce(0, +) }

    func args(_ job: KillJob, vm: Int, keep: Int) -> [String] {
        let common = ["--retry-lock", "30s", "--quiet"]
        switch job {
        case .backup: return ["backup", "--vm", vms[vm].name] + common + [vms[vm].path]
        case .prune: return ["prune", "--keep-last", "\(keep)"] + common
        case .gc: return ["gc"] + common
        }
    }

    /// `snapshots --json`, parsed into id -> snapshot.
    func listSnapshots(_ context: String) throws -> [String: ListedSnapshot] {
        let r = try env.cli.run(["snapshots", "--json"])
        #expect(r.exitedNormally && r.status == 0 && r.stderr.isEmpty, "\(label) \(context): snapshots --json: \(r)")
        let json = try JSONSerialization.jsonObject(with: r.stdoutData)
        let arr = try #require(json as? [[String: Any]], "\(label) \(context): snapshots --json is an array: \(r.stdout)")
        var out: [String: ListedSnapshot] = [:]
        for s in arr {
            let id = try #require(s.string("id")), vm = try #require(s.string("vm")), time = try #require(s.string("time"))
            out[id] = ListedSnapshot(id: id, vm: vm, time: time)
        }
        return out
    }

    func stampNewGeneration(_ vm: Int) throws {
        vms[vm].generation = nextGeneration
        nextGeneration += 1
        try stampGeneration(vms[vm].path, size: vms[vm].size, generation: vms[vm].generation)
    }

    /// No temporaries in tmp/, no lock file left: the last command finished and released its
    /// lock, and it (or the rerun) removed what a killed process had left.
    func expectClean(_ context: String) {
        let tmp = env.repoFiles("tmp")
        #expect(tmp.isEmpty, "\(label) \(context): leftovers in tmp/: \(tmp)")
        let locks = env.repoFiles("locks")
        let lockFiles = locks.filter { !($0 as NSString).lastPathComponent.hasPrefix(".") }
        #expect(lockFiles.isEmpty, "\(label) \(context): lock files left: \(lockFiles)")
        // A lock file being written is a dot file in locks/ until its rename: one a killed
        // process left stays until it is old enough for the next locker to remove it (checked
        // at the end). Each is reported once, with the job that first showed it.
        for name in locks where (name as NSString).lastPathComponent.hasPrefix(".") && leakedLockTemporaries[name] == nil {
            leakedLockTemporaries[name] = context
        }
    }

    func checkReadData(_ context: String) throws {
        checks += 1
        let r = try env.expect(0, ["check", "--read-data", "--retry-lock", "30s"])
        #expect(r.stdout.contains("no errors found"), "\(label) \(context): \(r)")
        expectClean("after check (\(context))")
    }

    /// Writes generation `generation` of `vm`'s disk to `path`.
    func materialize(_ vm: KillVM, generation: UInt64, to path: String) throws {
        try Disk.dense(path, size: vm.size, seed: vm.seed)
        try stampGeneration(path, size: vm.size, generation: generation)
    }

    func run() throws {
        let started = Date()
        try env.expect(0, ["init", "--encryption", encrypted ? "aes-256-gcm" : "none", "--chunk-size", "64K"])

        // Two generations of every disk, backed up; they and one run of each other job kind
        // give the first typical durations.
        for i in vms.indices { try Disk.dense(vms[i].path, size: vms[i].size, seed: vms[i].seed) }
        for round in 0..<2 {
            for i in vms.indices {
                try stampNewGeneration(i)
                let t = Date()
                try env.expect(0, args(.backup, vm: i, keep: 0))
                let d = Date().timeIntervalSince(t)
                typical[.backup] = round == 0 && i == 0 ? d : 0.5 * typical[.backup]! + 0.5 * d
                let now = try listSnapshots("setup")
                let added = Set(now.keys).subtracting(known.keys)
                #expect(added.count == 1, "\(label) setup: \(added.count) new snapshots")
                for id in added { generationOf[id] = (i, vms[i].generation) }
                known = now
            }
        }
        for job in [KillJob.prune, .gc] {
            let t = Date()
            try env.expect(0, args(job, vm: 0, keep: 2))
            typical[job] = Date().timeIntervalSince(t)
        }
        known = try listSnapshots("setup prune")
        expectClean("setup")

        var attempts = 0
        var nextCheckAt = 25
        while totalLanded < wantedKills && attempts < maxAttempts {
            attempts += 1
            let roll = rng.next() % 100
            var job: KillJob = roll < 50 ? .backup : (roll < 75 ? .prune : .gc)
            // Every kind gets kills even in a short run: the last kills go to kinds without one.
            let uncovered = KillJob.allCases.filter { (landed[$0] ?? 0) == 0 }
            if let first = uncovered.first, wantedKills - totalLanded <= uncovered.count { job = first }
            let vm = Int(rng.next() % UInt64(vms.count))
            let keep = 1 + Int(rng.next() % 3)
            if job == .backup { try stampNewGeneration(vm) }
            let jobArgs = args(job, vm: vm, keep: keep)
            let context = "attempt \(attempts) (\(jobArgs.joined(separator: " ")))"
            let before = known

            // Every eighth run of a kind is not killed: it measures the job's typical duration
            // (runs that merely finished before their kill would bias it to the short ones).
            // The others are killed somewhere in that duration, or a little after it.
            attemptsByKind[job, default: 0] += 1
            let calibration = attemptsByKind[job]! % 8 == 0
            let delay = Double(rng.next() % 10_000) / 10_000 * 1.15 * typical[job]!
            let t0 = Date()
            let p = try env.cli.start(jobArgs)
            if !calibration {
                usleep(useconds_t(delay * 1_000_000))
                p.send(SIGKILL)
            }
            let r = p.wait(timeout: 180)
            let elapsed = Date().timeIntervalSince(t0)
            let killed = r.signaled && r.status == SIGKILL
            if killed {
                landed[job, default: 0] += 1
                // What the dead process left in tmp/ (the rerun must remove it).
                let left = env.repoFiles("tmp").count
                if left > 0 { killsLeavingTemporaries += 1; temporariesLeft += left }
                // The same job again, to completion.
                let again = try env.cli.run(jobArgs, timeout: 180)
                if !(again.exitedNormally && again.status == 0) { rerunFailures += 1 }
                #expect(again.exitedNormally && again.status == 0, "\(label) \(context): the rerun after kill -9 failed: \(again)")
            } else {
                #expect(r.exitedNormally && r.status == 0, "\(label) \(context): a job that was not killed succeeds: \(r)")
                if calibration {
                    calibrations += 1
                    typical[job] = 0.5 * typical[job]! + 0.5 * elapsed
                } else {
                    finishedBeforeKill[job, default: 0] += 1
                }
            }

            // What the repository shows now, against what the job may have done.
            let now = try listSnapshots(context)
            let added = Set(now.keys).subtracting(before.keys)
            let removed = Set(before.keys).subtracting(now.keys)
            switch job {
            case .backup:
                #expect(removed.isEmpty, "\(label) \(context): a backup made snapshots disappear: \(removed)")
                // One snapshot from the completed run; a killed run may have committed its own
                // before it died (then the rerun adds a second one of the same data).
                #expect(added.count == 1 || (killed && added.count == 2), "\(label) \(context): \(added.count) new snapshots")
                if killed && added.count == 2 { backupsKilledAfterCommit += 1 }
                for id in added {
                    #expect(now[id]?.vm == vms[vm].name, "\(label) \(context): new snapshot \(id) belongs to \(now[id]?.vm ?? "?")")
                    generationOf[id] = (vm, vms[vm].generation)
                }
            case .prune:
                #expect(added.isEmpty, "\(label) \(context): prune added snapshots: \(added)")
                // Per VM exactly the newest `keep` snapshots remain.
                for v in vms {
                    let wanted = before.values.filter { $0.vm == v.name }.sorted { ($0.time, $0.id) < ($1.time, $1.id) }.suffix(keep).map(\.id)
                    let have = now.values.filter { $0.vm == v.name }.map(\.id)
                    #expect(Set(have) == Set(wanted), "\(label) \(context): VM \(v.name) keeps \(have.sorted()), expected the newest \(keep): \(wanted.sorted())")
                }
            case .gc:
                #expect(added.isEmpty && removed.isEmpty, "\(label) \(context): gc changed the snapshot list: +\(added) -\(removed)")
            }
            known = now
            expectClean(context)

            if totalLanded >= nextCheckAt {
                nextCheckAt += 25
                try checkReadData("after \(totalLanded) kills")
            }
        }

        // Final: the repository is intact and every surviving snapshot is byte-exact.
        try checkReadData("final")
        let finalList = try listSnapshots("final")
        var restored = 0
        let expected = env.file("expected.raw"), out = env.file("restored.raw")
        for s in finalList.values.sorted(by: { ($0.vm, $0.time, $0.id) < ($1.vm, $1.time, $1.id) }) {
            guard let g = generationOf[s.id] else {
                Issue.record("\(label): snapshot \(s.id) of \(s.vm) was never seen being created")
                continue
            }
            let vm = vms[g.vm]
            try? FileManager.default.removeItem(atPath: out)
            try env.expect(0, ["restore", s.id, "--disk", vm.diskName, "--to", out, "--format", "raw"])
            try materialize(vm, generation: g.generation, to: expected)
            #expect(try Disk.cmpEqual(expected, out), "\(label): snapshot \(s.id) of \(vm.name) differs from generation \(g.generation)")
            restored += 1
        }
        // The latest snapshot of each VM is its current disk.
        for vm in vms {
            try? FileManager.default.removeItem(atPath: out)
            try env.expect(0, ["restore", "latest", "--vm", vm.name, "--disk", vm.diskName, "--to", out, "--format", "raw"])
            #expect(try Disk.cmpEqual(vm.path, out), "\(label): latest snapshot of \(vm.name) differs from its last disk generation \(vm.generation)")
            restored += 1
        }
        expectClean("final")

        let seconds = Date().timeIntervalSince(started)
        func kinds(_ d: [KillJob: Int]) -> String { KillJob.allCases.map { "\($0.rawValue) \(d[$0] ?? 0)" }.joined(separator: ", ") }
        print("BATTERY kill-9 [\(label)]: \(totalLanded) kills landed (\(kinds(landed))) in \(attempts) attempts; "
              + "finished before the kill: \(kinds(finishedBeforeKill)); \(calibrations) unkilled timing runs; backups killed after commit \(backupsKilledAfterCommit); "
              + "\(killsLeavingTemporaries) kills left \(temporariesLeft) files in tmp/ for the rerun to remove; "
              + "failed reruns \(rerunFailures); \(leakedLockTemporaries.count) locks/.tmp-* files outlived the next command; \(checks) check --read-data passes; \(restored) restores byte-identical; "
              + "typical s: \(KillJob.allCases.map { "\($0.rawValue) \(String(format: "%.2f", typical[$0] ?? 0))" }.joined(separator: ", ")); "
              + "\(String(format: "%.0f", seconds)) s")
        // A lock file's temporary left by a killed writer (locks/.tmp-<lock id>.<writer>.<random>)
        // is removed by the next locker at once when the writer's pid is gone from this host,
        // else once it is older than lockTemporaryMaxAge (10 minutes): age any leftovers, take a
        // lock, and none may remain.
        let locksDir = env.repo + "/locks"
        let leftovers = ((try? FileManager.default.contentsOfDirectory(atPath: locksDir)) ?? []).filter { $0.hasPrefix(".tmp-") }
        for name in leftovers {
            var times = [timeval(tv_sec: time(nil) - 11 * 60, tv_usec: 0), timeval(tv_sec: time(nil) - 11 * 60, tv_usec: 0)]
            #expect(utimes(locksDir + "/" + name, &times) == 0)
        }
        try env.expect(0, ["check", "--retry-lock", "30s"])
        let remaining = ((try? FileManager.default.contentsOfDirectory(atPath: locksDir)) ?? []).filter { $0.hasPrefix(".") }
        let leaks = leakedLockTemporaries.sorted { $0.key < $1.key }.map { "\($0.key) (first seen after \($0.value))" }.joined(separator: "; ")
        #expect(remaining.isEmpty,
                "\(label): \(remaining.count) temporary lock files outlived the aged cleanup: \(remaining); seen during the run: \(leaks)")
        #expect(totalLanded >= wantedKills, "\(label): only \(totalLanded) of \(wantedKills) kills landed on a running process in \(attempts) attempts")
        for job in KillJob.allCases {
            #expect((landed[job] ?? 0) > 0, "\(label): no kill landed in a \(job.rawValue)")
        }
    }
}
