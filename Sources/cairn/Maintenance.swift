import ArgumentParser
import CairnCore
import Engine
import Foundation
import Repository
import RepositoryFormat

func printJSON<T: Encodable>(_ value: T) throws {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    FileHandle.standardOutput.write(try enc.encode(value) + Data("\n".utf8))
}

struct Prune: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Forget snapshots a retention policy does not keep (per VM); `cairn gc` then frees their data.",
        discussion: "Semantics as restic's `forget` (docs/RETENTION.md). Protected snapshots are always kept. -1 means unlimited."
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "Only snapshots of this VM.")
    var vm: String?
    @Option(help: "Keep the N newest snapshots.") var keepLast: Int?
    @Option(help: "Keep the newest snapshot of each of the last N hours (UTC).") var keepHourly: Int?
    @Option(help: "Keep the newest snapshot of each of the last N days (UTC).") var keepDaily: Int?
    @Option(help: "Keep the newest snapshot of each of the last N ISO weeks.") var keepWeekly: Int?
    @Option(help: "Keep the newest snapshot of each of the last N months.") var keepMonthly: Int?
    @Option(help: "Keep the newest snapshot of each of the last N years.") var keepYearly: Int?
    @Option(help: "Keep every snapshot within this duration of the newest one (e.g. 7d, 1y2m, 36h).") var keepWithin: String?
    @Flag(help: "Only show what would be forgotten.") var dryRun = false
    @Flag(help: "Run gc afterwards.") var gc = false

    func run() throws {
        for (name, value) in [("keep-last", keepLast), ("keep-hourly", keepHourly), ("keep-daily", keepDaily),
                              ("keep-weekly", keepWeekly), ("keep-monthly", keepMonthly), ("keep-yearly", keepYearly)] {
            if let value, value < -1 { throw CairnError(.usage, "--\(name) must be -1 (unlimited) or more, not \(value)") }
        }
        let policy = RetentionPolicy(keepLast: keepLast, keepHourly: keepHourly, keepDaily: keepDaily, keepWeekly: keepWeekly,
                                     keepMonthly: keepMonthly, keepYearly: keepYearly,
                                     keepWithin: try keepWithin.map { try Retention.parseDuration($0) })
        let repo = try options.open()
        let report = try PruneJob(repository: repo, policy: policy, vm: vm, dryRun: dryRun).run()
        var gcReport: GCReport?
        if gc && !dryRun { gcReport = try GarbageCollector(repository: repo).run() }
        if options.json {
            struct Out: Encodable { var prune: PruneReport; var gc: GCReport? }
            try printJSON(Out(prune: report, gc: gcReport))
            return
        }
        for name in report.unreadable { printError("cairn: warning: snapshot \(name) is unreadable and was left alone (run `cairn check`)") }
        if !options.quiet {
            for d in report.decisions {
                let time = String(d.time.prefix(19)).replacingOccurrences(of: "T", with: " ")
                let what = d.keep ? "keep  " : (dryRun ? "would forget" : "forget")
                print("\(what)  \(d.id.prefix(8))  \(time)  \(d.vm)\(d.reasons.isEmpty ? "" : "  (\(d.reasons.joined(separator: ", ")))")")
            }
        }
        let kept = report.decisions.filter(\.keep).count
        print(dryRun ? "would forget \(report.wouldRemove) snapshots, keep \(kept)" : "forgot \(report.removed) snapshots, kept \(kept)")
        if let g = gcReport { printGC(g) } else if !dryRun && report.removed > 0 { print("run `cairn gc` to free their data") }
    }
}

func printGC(_ g: GCReport) {
    let verb = g.dryRun ? "would delete" : "deleted"
    print("\(verb) \(g.deletedChunks) of \(g.storedChunks) chunks (\(ByteCount.format(g.deletedBytes))) and \(g.deletedIndexes) indexes; \(g.snapshots) snapshots keep \(g.referencedChunks) chunks")
    if g.deletedVerifications > 0 { print("\(verb) \(g.deletedVerifications) verification records of snapshots that no longer exist") }
}

struct GC: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Delete chunks and indexes no snapshot references.",
        discussion: "Marks under a shared lock (backups keep running), sweeps under an exclusive one (docs/FORMAT.md, \"Garbage collection\"). Use --retry-lock to wait for running jobs before the sweep."
    )

    @OptionGroup var options: RepositoryOptions
    @Flag(help: "Only count what would be deleted.") var dryRun = false

    func run() throws {
        let repo = try options.open()
        let cancel = CancellationToken()
        let signals = installSignalHandlers(cancel)
        defer { signals.forEach { $0.cancel() } }
        let report = try GarbageCollector(repository: repo, dryRun: dryRun, cancel: cancel).run()
        if options.json { try printJSON(report) } else { printGC(report) }
    }
}

struct Protect: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Protect snapshots from prune.")

    @OptionGroup var options: RepositoryOptions
    @Option(help: "Why (kept with the mark).") var note = ""
    @Argument(help: "Snapshot ids or unique prefixes.") var snapshots: [String]

    func run() throws { try setProtection(options: options, snapshots: snapshots, protect: true, note: note) }
}

struct Unprotect: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Let prune remove snapshots again.")

    @OptionGroup var options: RepositoryOptions
    @Argument(help: "Snapshot ids or unique prefixes.") var snapshots: [String]

    func run() throws { try setProtection(options: options, snapshots: snapshots, protect: false, note: "") }
}

private func setProtection(options: RepositoryOptions, snapshots: [String], protect: Bool, note: String) throws {
    guard !snapshots.isEmpty else { throw CairnError(.usage, "name at least one snapshot") }
    let repo = try options.open()
    let lock = try repo.lock(exclusive: false, job: protect ? "protect" : "unprotect")
    defer { lock.release() }
    let codec = repo.makeCodec()
    for ref in snapshots {
        let s = try repo.resolveSnapshot(ref, vm: nil, codec: codec)
        try repo.setMark(.protected, snapshot: s.id, protect ? SnapshotMark(note: note) : nil)
        if !options.quiet { print("\(protect ? "protected" : "unprotected") snapshot \(s.id.short) (\(s.manifest.vm), \(s.manifest.time))") }
    }
}

struct Repair: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Set corrupt objects aside and mark (or forget) the snapshots that lost data.",
        discussion: "Reads every chunk like `check --read-data`. Corrupt objects move to quarantine/; the next backup of the same data stores them again, and a later repair clears the damaged mark."
    )

    @OptionGroup var options: RepositoryOptions
    @Flag(help: "Only report what would be done.") var dryRun = false
    @Flag(help: "Forget damaged snapshots instead of marking them.") var forgetDamaged = false

    func run() throws {
        let repo = try options.open()
        let cancel = CancellationToken()
        let signals = installSignalHandlers(cancel)
        defer { signals.forEach { $0.cancel() } }
        let r = try RepairJob(repository: repo, dryRun: dryRun, forgetDamaged: forgetDamaged, progress: options.progress(), cancel: cancel).run()
        if options.json { try printJSON(r); return }
        let would = dryRun ? "would be " : ""
        for p in r.check.problems { print("\(p.state) \(p.kind) \(p.object)") }
        for q in r.quarantined { print("\(would)moved to quarantine: \(q)") }
        for s in r.markedDamaged { print("\(would)marked damaged: snapshot \(s.prefix(8))") }
        for s in r.forgotten { print("\(would)forgotten: snapshot \(s.prefix(8))") }
        for s in r.healed { print("\(would)healed (complete again): snapshot \(s.prefix(8))") }
        for u in r.unreadable { print("left in place, the storage could not deliver it: \(u) (run repair again when the storage is healthy)") }
        print(r.check.problems.isEmpty && r.healed.isEmpty ? "nothing to repair" : "\(r.check.problems.count) problems, \(r.quarantined.count) objects set aside, \(r.markedDamaged.count + r.forgotten.count) snapshots affected")
    }
}
