import ArgumentParser
import CairnCore
import Engine
import Foundation
import Repository
import RepositoryFormat
#if canImport(Glibc)
import Glibc
#endif

/// The boot level: each snapshot booted once in an isolated sandbox (docs/SANDBOX.md); the
/// screenshot and the serial log are kept with the record as evidence.
func makeBootVerifier(boot: SandboxBootOptions, quiet: Bool, repository: Repository,
                      cancel: CancellationToken) -> (SnapshotEntry) throws -> BootOutcome {
    { snapshot in
        let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent("cairn-bootcheck-\(snapshot.id.short)-\(UUID().uuidString.prefix(8))")
        let options = try boot.sandboxOptions(workDir: dir, quiet: quiet)
        let outcome = try Sandbox(repository: repository, snapshot: snapshot, options: options).verify(cancel: cancel)
        try cancel.check()
        var evidence: [(name: String, bytes: [UInt8])] = [("serial.log", outcome.serialLog)]
        if let png = outcome.screenshotPNG { evidence.append(("screenshot.png", png)) }
        let reason = "\(outcome.reason) (\(outcome.accel), \(String(format: "%.1f", outcome.seconds)) s)"
        return BootOutcome(passed: outcome.passed, reason: reason, evidence: evidence)
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Verify snapshots (data, file systems, boot) and show the results kept in the repository.",
        discussion: """
        Levels are cumulative: data reads and checks every chunk; filesystem also opens and walks every guest \
        file system and runs its own checker read-only (e2fsck -fn, xfs_repair -n, fsck.fat -n, ntfsfix -n) when \
        installed; boot also boots the snapshot in an isolated sandbox. Each result is stored in the repository \
        (`cairn snapshots` shows the newest), and a backup never deduplicates against chunks a failed verification \
        found bad (docs/VERIFY.md). Exit status 0: all passed; 3: a snapshot failed.
        """
    )

    @OptionGroup var options: RepositoryOptions

    @OptionGroup(title: "Boot level (the sandbox, docs/SANDBOX.md)") var boot: SandboxBootOptions

    @Argument(help: "Snapshots to verify (id, unique prefix or 'latest').")
    var snapshots: [String] = []

    @Option(help: "data, filesystem or boot (cumulative).")
    var level = "data"

    @Option(help: "Only snapshots of this VM (with --latest, --all-unverified, --report, and what 'latest' means).")
    var vm: String?

    @Flag(help: "Verify the newest snapshot of --vm.")
    var latest = false

    @Flag(help: "Verify every snapshot (of --vm) without a record at this level or above.")
    var allUnverified = false

    @Option(help: "Read only a random percentage of each snapshot's chunks at data level (e.g. 10%).")
    var sample: String?

    @Flag(help: "Do not run the file systems' own checkers at filesystem level (only Cairn's walk).")
    var noNativeCheck = false

    @Option(help: "Kill a native checker that runs longer than this (e.g. 30m; default 30m).")
    var checkerTimeout: String?

    @Flag(help: "Show the stored results instead of verifying: a table, or JSON with --json.")
    var report = false

    @Option(help: "Write the evidence files (screenshot, serial log) of this snapshot's newest record that has any into --to.")
    var evidence: String?

    @Option(help: "Directory for --evidence.")
    var to: String?

    func validate() throws {
        let selections = (snapshots.isEmpty ? 0 : 1) + (latest ? 1 : 0) + (allUnverified ? 1 : 0)
        if report || evidence != nil {
            guard !(report && evidence != nil) else { throw ValidationError("give --report or --evidence, not both") }
            guard selections == 0, sample == nil else {
                throw ValidationError("--report and --evidence take no snapshots, --latest, --all-unverified or --sample")
            }
            if evidence != nil && to == nil { throw ValidationError("--evidence needs --to DIR") }
            return
        }
        if to != nil { throw ValidationError("--to goes with --evidence") }
        guard selections == 1 else {
            throw ValidationError("name the snapshots to verify: SNAPSHOT..., --vm NAME --latest, or --all-unverified")
        }
        if latest && vm == nil { throw ValidationError("--latest needs --vm NAME") }
    }

    func run() throws {
        if report { return try showReport() }
        if let evidence { return try writeEvidence(evidence) }
        guard let level = VerifyLevel(rawValue: level) else {
            throw CairnError(.usage, "unknown level '\(self.level)'", hint: "use data, filesystem or boot")
        }
        let fraction = try sample.map { try VerifyJob.parseSample($0) }
        let timeout = try checkerTimeout.map { try parseWaitDuration($0) } ?? 1800
        let repo = try options.open()
        let codec = repo.makeCodec()
        var targets: [SnapshotEntry]
        if latest {
            targets = [try repo.resolveSnapshot("latest", vm: vm, codec: codec)]
        } else if allUnverified {
            let (all, failures) = try repo.listSnapshots(codec: codec)
            for (name, e) in failures where e.code != .notFound {
                printError("cairn: warning: snapshot \(name) is unreadable and not verified: \(e.description)")
            }
            targets = VerifyJob.unverified(all.filter { vm == nil || $0.manifest.vm == vm },
                                           records: try repo.allVerifications().records, level: level)
        } else {
            targets = []
            for ref in snapshots {
                let s = try repo.resolveSnapshot(ref, vm: vm, codec: codec)
                if !targets.contains(where: { $0.id == s.id }) { targets.append(s) }
            }
        }
        let cancel = CancellationToken()
        let signals = installSignalHandlers(cancel)
        defer { signals.forEach { $0.cancel() } }
        let job = VerifyJob(repository: repo, level: level, sample: fraction, nativeCheckers: !noNativeCheck, checkerTimeout: timeout,
                            boot: makeBootVerifier(boot: boot, quiet: options.quiet || options.json, repository: repo, cancel: cancel),
                            progress: options.progress(), cancel: cancel, toolVersion: "cairn \(cairnVersion)")
        if targets.isEmpty {
            if level == .boot { _ = try job.run([]) }   // the usage error when boot cannot run
            if options.json { try printJSONArray([]) } else if !options.quiet { print("nothing to verify") }
            return
        }
        let records = try job.run(targets) { record in
            guard !options.json else { return }
            printRecord(record, details: !options.quiet)
        }
        if options.json {
            try printJSONArray(records.map { verificationJSON($0, latest: true) })
        } else {
            let failed = records.filter { $0.outcome == .failed }.count
            print("\(records.count) snapshot\(records.count == 1 ? "" : "s") verified at \(level.rawValue) level: \(records.count - failed) passed, \(failed) failed")
        }
        let failed = records.filter { $0.outcome == .failed }.count
        if failed > 0 {
            throw CairnError(.corrupt, "\(failed) of \(records.count) snapshot\(records.count == 1 ? "" : "s") failed verification",
                             hint: "see `cairn verify --report`; the next backup of the VM stores any bad chunks again")
        }
    }

    private func printRecord(_ r: VerificationRecord, details: Bool) {
        let head = "snapshot \(r.snapshot.prefix(8)) (\(r.vm))"
        if r.outcome == .passed {
            print("\(head): passed \(r.levels.map(\.level.rawValue).joined(separator: ", "))\(r.sample.map { " (data sample \(percentText($0)))" } ?? "")")
        } else {
            let failed = r.levels.first { $0.outcome == .failed }
            print("\(head): FAILED at \(failed?.level.rawValue ?? r.level.rawValue): \(failed?.reason ?? r.reason)")
        }
        guard details else { return }
        for l in r.levels {
            print("  \(l.level.rawValue): \(l.outcome.rawValue)\(l.outcome == .skipped ? "" : String(format: " (%.1f s)", l.seconds))")
            for d in l.details { print("    \(d)") }
        }
    }

    private func showReport() throws {
        let repo = try options.open()
        let codec = repo.makeCodec()
        let snapshots = try repo.listSnapshots(codec: codec).snapshots.filter { vm == nil || $0.manifest.vm == vm }
        let (records, failures) = try repo.allVerifications()
        for f in failures { printError("cairn: warning: verification record \(f.name) is unreadable: \(f.error.description)") }
        var rows: [(SnapshotEntry, VerificationRecord, Bool)] = []
        for s in snapshots {
            let list = records[s.id.hex] ?? []
            for (i, r) in list.enumerated() { rows.append((s, r, i == list.count - 1)) }
        }
        if options.json {
            try printJSONArray(rows.map { s, r, latest in
                var o = verificationJSON(r, latest: latest)
                o["snapshot_time"] = s.manifest.time
                return o
            })
            return
        }
        print("Snapshot  VM               Time                 Level       Outcome  Reason")
        print(String(repeating: "-", count: 100))
        for (_, r, _) in rows {
            let time = String(r.time.prefix(19)).replacingOccurrences(of: "T", with: " ")
            let levelText = r.level.rawValue + (r.sample.map { "(\(percentText($0)))" } ?? "")
            print("\(r.snapshot.prefix(8))  \(pad(r.vm, 15))  \(pad(time, 19))  \(pad(levelText, 10))  \(pad(r.outcome.rawValue, 7))  \(r.reason)")
        }
        print(String(repeating: "-", count: 100))
        let verified = Set(rows.map { $0.0.id })
        print("\(rows.count) record\(rows.count == 1 ? "" : "s") for \(verified.count) of \(snapshots.count) snapshot\(snapshots.count == 1 ? "" : "s")")
    }

    private func writeEvidence(_ ref: String) throws {
        guard let to else { throw CairnError(.usage, "--evidence needs --to DIR") }
        let repo = try options.open()
        let snapshot = try repo.resolveSnapshot(ref, vm: vm, codec: repo.makeCodec())
        guard let record = try repo.verifications(for: snapshot.id).last(where: { !$0.evidence.isEmpty }) else {
            throw CairnError(.notFound, "snapshot \(snapshot.id.short) has no verification record with evidence files",
                             hint: "evidence is kept by boot-level verification")
        }
        do {
            try FileManager.default.createDirectory(atPath: to, withIntermediateDirectories: true)
        } catch {
            throw CairnError(.io, "cannot create the directory: \(error.localizedDescription)", path: to)
        }
        for e in record.evidence {
            let path = (to as NSString).appendingPathComponent(e.name)
            if FileManager.default.fileExists(atPath: path) {
                throw CairnError(.usage, "\(path) already exists", hint: "choose an empty directory")
            }
            let file = try PosixFile(path: path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o644)
            try e.data.withUnsafeBytes { try file.pwrite($0, at: 0) }
            if !options.quiet && !options.json { print("\(path) (\(ByteCount.format(UInt64(e.data.count))))") }
        }
        if options.json {
            try printJSONArray(record.evidence.map { ["name": $0.name, "size": $0.data.count,
                                                      "path": (to as NSString).appendingPathComponent($0.name)] as [String: Any] })
        }
    }
}

private func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s.padding(toLength: n, withPad: " ", startingAt: 0) }

func percentText(_ fraction: Double) -> String {
    let p = fraction * 100
    return p == p.rounded() ? "\(Int(p))%" : String(format: "%.2f%%", p)
}

/// A record as JSON for `verify --json`, `verify --report --json` and `snapshots --json`
/// (evidence as names and sizes; `--evidence` writes the files).
func verificationJSON(_ r: VerificationRecord, latest: Bool? = nil) -> [String: Any] {
    var o: [String: Any] = [
        "snapshot": r.snapshot, "short_id": String(r.snapshot.prefix(8)), "vm": r.vm, "time": r.time, "host": r.host,
        "tool_version": r.toolVersion, "level": r.level.rawValue, "outcome": r.outcome.rawValue, "reason": r.reason,
        "sample": r.sample.map { $0 as Any } ?? NSNull(), "failed_level": r.failedLevel.map { $0.rawValue as Any } ?? NSNull(),
        "bad_chunks": r.badChunks,
        "levels": r.levels.map { l in
            ["level": l.level.rawValue, "outcome": l.outcome.rawValue, "reason": l.reason, "details": l.details,
             "seconds": l.seconds] as [String: Any]
        },
        "evidence": r.evidence.map { ["name": $0.name, "size": $0.data.count] as [String: Any] },
    ]
    if let latest { o["latest"] = latest }
    return o
}

/// The "Verified" column of `cairn snapshots`: `filesystem ok 11-25`, `data FAILED`, `-`.
func verifiedSummary(_ r: VerificationRecord?) -> String {
    guard let r else { return "-" }
    if r.outcome == .failed { return "\((r.failedLevel ?? r.level).rawValue) FAILED" }
    let day = r.time.count >= 10 ? String(r.time.dropFirst(5).prefix(5)) : r.time
    return "\(r.level.rawValue)\(r.sample.map { "(\(percentText($0)))" } ?? "") ok \(day)"
}

func printJSONArray(_ items: [Any]) throws {
    let d = try JSONSerialization.data(withJSONObject: items, options: [.prettyPrinted, .sortedKeys])
    FileHandle.standardOutput.write(d + Data("\n".utf8))
}
