import CairnCore
import CairnTestSupport
import Foundation
import Testing

/// The write order of docs/FORMAT.md ("Write order and atomicity"), checked on the system
/// calls of a real backup traced with strace: object data is synced before its rename, the
/// names of chunks and indexes (including any directory created for them) are durable before
/// the manifest is renamed into place, and the manifest's name is durable before exit.
@Suite("CLI durability")
struct DurabilityTests {
    enum Event: Equatable {
        case mkdir(String)
        case sync(String)
        /// `syncfs`: every file written before it is durable after it.
        case syncAll
        /// A file created (`openat` with `O_CREAT`).
        case create(String)
        case rename(from: String, to: String)
    }

    /// Parses `strace -f -y` output into successful events, in completion order. Calls split
    /// by thread switches ("<unfinished ...>" / "<... resumed>") are joined.
    static func parse(_ text: String) -> [Event] {
        var pending: [String: String] = [:]
        var events: [Event] = []
        func quoted(_ s: Substring) -> [String] {
            var out: [String] = []
            var cur = "", inside = false, escaped = false
            for ch in s {
                if inside {
                    if escaped { cur.append(ch); escaped = false } else if ch == "\\" { escaped = true } else if ch == "\"" { out.append(cur); cur = ""; inside = false } else { cur.append(ch) }
                } else if ch == "\"" { inside = true }
            }
            return out
        }
        for raw in text.split(separator: "\n") {
            guard let space = raw.firstIndex(of: " ") else { continue }
            let pid = String(raw[..<space])
            // strace pads the pid column: "123  fsync(...)" and "12345 fsync(...)".
            var call = String(raw[raw.index(after: space)...].drop { $0 == " " })
            if call.hasSuffix("<unfinished ...>") {
                pending[pid] = String(call.dropLast("<unfinished ...>".count))
                continue
            }
            if call.hasPrefix("<... "), let close = call.range(of: " resumed>") {
                call = (pending.removeValue(forKey: pid) ?? "") + call[close.upperBound...]
            }
            if call.hasPrefix("openat("), call.contains("O_CREAT"),
               call.range(of: #"\)\s+= [0-9]+<[^>]*>$"#, options: .regularExpression) != nil {
                if let p = quoted(call[...]).first { events.append(.create(p)) }
                continue
            }
            guard call.range(of: #"\)\s+= 0$"#, options: .regularExpression) != nil else { continue }
            if call.hasPrefix("mkdir(") || call.hasPrefix("mkdirat(") {
                if let p = quoted(call[...]).first { events.append(.mkdir(p)) }
            } else if call.hasPrefix("syncfs(") {
                events.append(.syncAll)
            } else if call.hasPrefix("fsync(") || call.hasPrefix("fdatasync(") {
                if let lt = call.firstIndex(of: "<"), let gt = call[lt...].firstIndex(of: ">") {
                    events.append(.sync(String(call[call.index(after: lt)..<gt])))
                }
            } else if call.hasPrefix("rename(") || call.hasPrefix("renameat(") || call.hasPrefix("renameat2(") {
                let q = quoted(call[...])
                if q.count == 2 { events.append(.rename(from: q[0], to: q[1])) }
            }
        }
        return events
    }

    static func parent(_ p: String) -> String { (p as NSString).deletingLastPathComponent }

    @Test("a traced backup syncs data before names and every name before the manifest (chunks synced per file, or per group by syncfs)",
          arguments: ["file", "filesystem"])
    func writeOrder(syncLevel: String) throws {
        let strace = try Tool.which("strace")
        let env = try CLIEnv("cli-durable", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let disk = env.file("d.raw")
        try Disk.dense(disk, size: 4 * MiB, seed: 97)
        let trace = env.file("trace.txt")
        let r = try Tool.run(strace, ["-f", "-y", "-qq", "-e", "trace=mkdir,mkdirat,openat,fsync,fdatasync,syncfs,rename,renameat,renameat2", "-o", trace,
                                      env.cli.binary, "backup", "--vm", "d", disk],
                             environment: ["CAIRN_REPO": env.repo, "CAIRN_SYNC": syncLevel], check: false)
        #expect(r.status == 0, "strace + backup: \(r.stderr)")
        let traceText = try String(contentsOfFile: trace, encoding: .utf8)
        let events = Self.parse(traceText)
        let snapshots = env.repo + "/snapshots"
        let manifestAt = try #require(events.firstIndex { if case .rename(_, let to) = $0 { Self.parent(to) == snapshots } else { false } },
                                      "the trace shows the manifest's rename: \(events.count) events; trace ends with \(traceText.suffix(1500))")
        func synced(_ path: String, in range: Range<Int>) -> Bool {
            range.contains { events[$0] == .sync(path) }
        }

        var objects = 0, chunksSyncedAlone = 0, chunksSyncedInGroup = 0
        for (i, e) in events.enumerated() {
            guard case .rename(let from, let to) = e else { continue }
            objects += 1
            // The object's bytes are durable before it gets its name: its own sync, or a
            // syncfs after it was created.
            let created = events[0..<i].lastIndex(of: .create(from))
            #expect(created != nil, "the trace shows \(from) being created")
            let alone = synced(from, in: 0..<i)
            let inGroup = created.map { c in events[c..<i].contains(.syncAll) } ?? false
            #expect(alone || inGroup, "\(to) renamed before its data was synced")
            if to.hasPrefix(env.repo + "/chunks/") {
                if alone { chunksSyncedAlone += 1 }
                if inGroup && !alone { chunksSyncedInGroup += 1 }
            }
            // Chunk and index names are durable before the manifest refers to them.
            if i < manifestAt {
                #expect(synced(Self.parent(to), in: i..<manifestAt), "directory of \(to) not synced before the manifest")
            }
        }
        #expect(objects >= 64 + 2, "64 chunks, an index and the manifest were stored (\(objects) renames)")
        if syncLevel == "file" {
            #expect(chunksSyncedAlone >= 64 && chunksSyncedInGroup == 0, "file: \(chunksSyncedAlone) chunks fdatasynced, \(chunksSyncedInGroup) by syncfs")
        } else {
            #expect(chunksSyncedInGroup >= 64 && chunksSyncedAlone == 0, "filesystem: \(chunksSyncedInGroup) chunks made durable by syncfs, \(chunksSyncedAlone) fdatasynced")
        }
        #expect(synced(snapshots, in: manifestAt..<events.count), "the manifest's name is made durable")

        // A directory created for new objects must itself be durable (its parent synced)
        // before the manifest, or a crash can lose a whole fan-out directory of chunks.
        let created = events.enumerated().compactMap { i, e -> (Int, String)? in
            if case .mkdir(let d) = e, i < manifestAt { (i, d) } else { nil }
        }
        #expect(created.count >= 2, "the backup created fan-out directories: \(created)")
        let unsynced = created.filter { i, d in !synced(Self.parent(d), in: i..<manifestAt) }.map(\.1)
        #expect(unsynced.isEmpty, "\(unsynced.count) of \(created.count) new directories have no synced parent before the manifest, e.g. \(unsynced.prefix(3))")
    }

    @Test("a restore fsyncs its target before it reports success; --no-sync does not, and writes the same bytes",
          arguments: ["raw", "qcow2"])
    func restoreSync(format: String) throws {
        let strace = try Tool.which("strace")
        let env = try CLIEnv("cli-restore-sync", password: nil)
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let disk = env.file("d.raw")
        try Disk.dense(disk, size: 2 * MiB, seed: 98)
        try env.expect(0, ["backup", "--vm", "d", "--quiet", disk])
        var outputs: [String] = []
        for noSync in [false, true] {
            let out = env.file("out-\(noSync).\(format)")
            let trace = env.file("trace-\(noSync).txt")
            let args = ["restore", "latest", "--to", out, "--format", format] + (noSync ? ["--no-sync"] : [])
            let r = try Tool.run(strace, ["-f", "-y", "-qq", "-e", "trace=fsync,fdatasync", "-o", trace, env.cli.binary] + args,
                                 environment: ["CAIRN_REPO": env.repo], check: false)
            #expect(r.status == 0, "strace + restore: \(r.stderr)")
            let synced = Self.parse(try String(contentsOfFile: trace, encoding: .utf8)).contains { $0 == .sync(out) }
            #expect(synced == !noSync, "\(noSync ? "--no-sync" : "default"): target fsynced = \(synced)")
            outputs.append(out)
        }
        let compare = try Tool.run("qemu-img", ["compare", "-f", format, "-F", format, outputs[0], outputs[1]], check: false)
        #expect(compare.status == 0, "both restores hold the same disk: \(compare.stdout)")
        let original = try Tool.run("qemu-img", ["compare", "-f", "raw", "-F", format, disk, outputs[1]], check: false)
        #expect(original.status == 0, "the --no-sync restore equals the disk: \(original.stdout)")
    }
}
